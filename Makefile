# d4c build, test and benchmark entry points.  `make deps` is idempotent and
# installs what a fresh Debian/Ubuntu machine lacks (apt packages only as root).
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
export PYTHONPATH := $(CURDIR)/src

APT_PACKAGES := build-essential pkg-config libfuse-dev fuse3 zstd attr xdelta3 \
                umoci skopeo busybox-static containerd runc docker-registry debootstrap
KERNELS := src/d4c/_patch.pyx src/d4c/_chunker.pyx src/d4c/_tables.pyx src/d4c/_deflate.pyx src/d4c/_x86.pyx
BINARIES := ctr-cli snapshotter server

.PHONY: deps apt venv ext proto test all dist bench bench-link bench-faults demo clean

deps: apt venv ext

apt:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if ! command -v $(PYTHON) >/dev/null 2>&1; then missing="$$missing python3.11 python3.11-venv python3.11-dev"; fi; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ]; then \
	    echo "apt: installing$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	  else echo "apt: missing$$missing (run make deps as root to install them)"; fi; \
	fi

$(VENV)/.stamp: requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -r requirements-dev.txt
	touch $@

venv: $(VENV)/.stamp

ext: $(VENV)/.stamp $(KERNELS) setup.py proto
	$(PY) setup.py -q build_ext --inplace

# containerd API stubs: generated from our .proto files (and committed, so a
# plain checkout imports); regenerated when a .proto changes
PROTOS := $(wildcard src/d4c/snap/api/*.proto src/d4c/snap/api/types/*.proto)
PROTO_STAMP := src/d4c/snap/api/.generated
proto: $(PROTO_STAMP)
$(PROTO_STAMP): $(PROTOS) | $(VENV)/.stamp
	$(PY) -m grpc_tools.protoc -I src --python_out=src --grpc_python_out=src $(PROTOS)
	touch $@

test: deps all dist
	CI=$(CI) D4C_BINARIES=$(CURDIR) D4C_DIST=$(CURDIR)/$(DIST) $(PY) -m pytest -q tests

all: deps $(BINARIES)

$(BINARIES) &: build/pyinstaller.spec $(shell find src -name '*.py' -o -name '*.pyx') | ext
	$(VENV)/bin/pyinstaller -y --clean --log-level WARN --workpath build/pyinstaller \
	  --distpath dist build/pyinstaller.spec
	for b in $(BINARIES); do cp dist/$$b .$$b.tmp && mv -f .$$b.tmp $$b; done  # a running binary is replaced, not overwritten

# the offline edge bundle: the programs, install script, systemd units, INSTALL
VERSION := $(shell sed -n 's/^__version__ = "\(.*\)"/\1/p' src/d4c/__init__.py)
DIST := d4c-$(VERSION)-linux-x86_64.tar.gz
dist: $(DIST)
# one shared one-dir runtime (d4c/, made with the binaries) and the three names as links to
# it: a call unpacks nothing, where a one-file binary unpacks ~90 MB at every start
$(DIST): $(BINARIES) install_snapshotter.sh packaging/INSTALL $(wildcard systemd/*.service)
	rm -rf build/dist && mkdir -p build/dist/d4c-$(VERSION)/systemd
	cp -a dist/d4c build/dist/d4c-$(VERSION)/d4c
	for b in $(BINARIES); do ln -s d4c/d4c build/dist/d4c-$(VERSION)/$$b; done
	cp install_snapshotter.sh build/dist/d4c-$(VERSION)/
	sed 's/@VERSION@/$(VERSION)/g' packaging/INSTALL > build/dist/d4c-$(VERSION)/INSTALL
	cp systemd/*.service build/dist/d4c-$(VERSION)/systemd/
	tar -C build/dist --owner=0 --group=0 --sort=name -czf $@.tmp d4c-$(VERSION) && mv $@.tmp $@

bench: deps dist
	$(PIP) install -q -r requirements-bench.txt
	cd $(CURDIR) && PYTHONPATH=$(CURDIR)/src:$(CURDIR) $(PY) -m bench

# the thin-link benchmark (as root): full `ctr images pull` vs `ctr-cli pull` over a shaped
# veth pair between two network namespaces; runs the binaries, so it needs `all`
bench-link: all
	$(PIP) install -q -r requirements-bench.txt
	cd $(CURDIR) && PYTHONPATH=$(CURDIR)/src:$(CURDIR) $(PY) -m bench.link_bench

# the long form of the fault campaign (as root): every scenario of tests/test_faults.py
# D4C_FAULT_RUNS times (20), counts in bench/results/faults.md
bench-faults: all
	$(PIP) install -q -r requirements-bench.txt
	cd $(CURDIR) && PYTHONPATH=$(CURDIR)/src:$(CURDIR) $(PY) -m bench.faults_bench

demo: all
	bash demo/demo.sh

clean:
	rm -rf build/lib.* build/temp.* build/cython build/pyinstaller build/dist dist $(BINARIES) d4c-*-linux-*.tar.gz
	rm -f src/d4c/*.so
	find src tests -name __pycache__ -type d -prune -exec rm -rf {} +

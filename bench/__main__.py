"""`make bench`: every benchmark, results as tables in bench/results/."""

from __future__ import annotations

import sys

from . import delta_bench, footprint_bench, image_bench, llfs_bench, pack_bench


def main() -> int:
    rc = pack_bench.main()
    rc |= delta_bench.main()
    rc |= image_bench.main()
    rc |= llfs_bench.main()
    rc |= footprint_bench.main()
    return rc


if __name__ == "__main__":
    sys.exit(main())

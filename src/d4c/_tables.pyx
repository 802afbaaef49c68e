# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Tree-table scanning: one row of integers per entry (docs/FORMAT.md, "Tree table").

Opening an image decodes tens of thousands of entries; a merge opens three
images.  This loop reads the varints, checks structure and ranges, and leaves
building the entries (and the checks that need Python objects: paths, parent
directories, xattr names, symlink targets) to dimg.py.  It runs without the GIL.
_tables_py.py is the reference and must give the same rows and errors.
"""

from libc.stdint cimport int64_t, uint8_t, uint64_t

API_VERSION = "1"

# columns of a row
cdef enum:
    C_PATH_OFF = 0
    C_PATH_LEN = 1
    C_TYPE = 2
    C_PLAIN = 3       # 1: the path passed the quick safety check (else dimg asks path_problem)
    C_LINK = 4
    C_MODE = 5
    C_UID = 6
    C_GID = 7
    C_MTIME = 8
    C_XATTR_OFF = 9   # where the xattr list starts (its names are checked in Python)
    C_NXATTR = 10
    C_SIZE = 11
    C_DATA_OFF = 12   # FILE: digest, SYMLINK: target
    C_DATA_LEN = 13
    C_MAJOR = 14
    C_MINOR = 15
    NCOL = 16

# error codes (dimg.SCAN_ERRORS has their messages)
cdef enum:
    E_TRUNCATED = 1
    E_NONCANONICAL = 2
    E_VARINT_LONG = 3
    E_PATH_LONG = 4
    E_ORDER = 5
    E_TYPE = 6
    E_ROOT = 7
    E_LINK = 8
    E_OWNER = 9
    E_XATTR_COUNT = 10
    E_XATTR_LONG = 11
    E_SIZE = 12
    E_SYMLINK_LONG = 13
    E_DEVICE = 14

cdef enum:
    T_FILE = 1
    T_DIR = 2
    T_SYMLINK = 3
    T_HARDLINK = 4
    T_CHARDEV = 5
    T_BLOCKDEV = 6
    T_FIFO = 7

cdef uint64_t MAX_ID = 0xFFFFFFFF
cdef uint64_t MAX_FILE_SIZE = 0x7FFFFFFFFFFFFFFF


cdef struct Reader:
    const uint8_t* buf
    Py_ssize_t pos
    Py_ssize_t end
    int err
    uint64_t value     # the offending value of a range error


cdef inline uint64_t _uv(Reader* r) noexcept nogil:
    """A canonical LEB128 varint of at most 64 bits; sets r.err on failure."""
    cdef uint64_t result = 0
    cdef unsigned int shift = 0
    cdef uint8_t b
    while True:
        if r.pos >= r.end:
            r.err = E_TRUNCATED
            return 0
        b = r.buf[r.pos]
        r.pos += 1
        if shift == 63 and b > 1:
            r.err = E_VARINT_LONG
            return 0
        result |= (<uint64_t>(b & 0x7F)) << shift
        if b < 0x80:
            if b == 0 and shift:
                r.err = E_NONCANONICAL
                return 0
            return result
        shift += 7


cdef inline bint _plain(const uint8_t* p, Py_ssize_t n, Py_ssize_t max_name) noexcept nogil:
    """Every component non-empty, not "." or "..", no NUL; short enough that no
    component can be too long.  Anything else goes to tree.path_problem."""
    cdef Py_ssize_t i, start = 0, clen
    if n == 0 or n > max_name:
        return False
    for i in range(n + 1):
        if i == n or p[i] == 0x2F:
            clen = i - start
            if clen == 0 or (clen == 1 and p[start] == 0x2E) or \
                    (clen == 2 and p[start] == 0x2E and p[start + 1] == 0x2E):
                return False
            start = i + 1
        elif p[i] == 0:
            return False
    return True


cdef inline bint _less(const uint8_t* a, Py_ssize_t na, const uint8_t* b, Py_ssize_t nb) noexcept nogil:
    """a < b as byte strings."""
    cdef Py_ssize_t i, n = na if na < nb else nb
    for i in range(n):
        if a[i] != b[i]:
            return a[i] < b[i]
    return na < nb


cdef inline Py_ssize_t _span(Reader* r, uint64_t limit, int err_long, int64_t* length) noexcept nogil:
    """A length-prefixed byte string: its offset, its length in *length (set only
    on success), or -1 with r.err set."""
    cdef uint64_t n = _uv(r)
    cdef Py_ssize_t start
    if r.err:
        return -1
    if n > limit:
        r.err, r.value = err_long, n
        return -1
    if n > <uint64_t>(r.end - r.pos):
        r.err = E_TRUNCATED
        return -1
    start = r.pos
    r.pos += <Py_ssize_t>n
    length[0] = <int64_t>n
    return start


cdef Py_ssize_t _scan(Reader* r, Py_ssize_t count, int64_t* rows, Py_ssize_t max_path, Py_ssize_t max_name,
                      uint64_t max_xattr_name, uint64_t max_xattr_value, uint64_t max_symlink) noexcept nogil:
    """Fill rows; return the index of the failing entry (r.err set) or count."""
    cdef Py_ssize_t index, prev_off = 0, prev_len = -1, nx, k
    cdef int64_t* row
    cdef int64_t skipped
    cdef Py_ssize_t start
    cdef uint64_t n, t, link, mode, uid, gid, z, size, major, minor
    for index in range(count):
        row = rows + index * NCOL
        for k in range(NCOL):
            row[k] = 0
        row[C_PATH_LEN] = -1
        start = _span(r, <uint64_t>max_path, E_PATH_LONG, &row[C_PATH_LEN])
        if r.err:
            return index
        row[C_PATH_OFF] = start
        n = <uint64_t>row[C_PATH_LEN]
        row[C_PLAIN] = _plain(r.buf + row[C_PATH_OFF], <Py_ssize_t>n, max_name)
        if prev_len >= 0 and not _less(r.buf + prev_off, prev_len, r.buf + row[C_PATH_OFF], <Py_ssize_t>n):
            r.err = E_ORDER
            return index
        prev_off, prev_len = row[C_PATH_OFF], <Py_ssize_t>n
        if r.pos >= r.end:
            r.err = E_TRUNCATED
            return index
        t = r.buf[r.pos]
        r.pos += 1
        if t < T_FILE or t > T_FIFO:
            r.err, r.value = E_TYPE, t
            return index
        row[C_TYPE] = <int64_t>t
        if (index == 0) != (n == 0 and t == T_DIR):
            # the root comes first, and only first (a later b"" is out of order anyway)
            r.err = E_ROOT if index == 0 else E_ORDER
            return index
        if t == T_HARDLINK:
            link = _uv(r)
            if r.err:
                return index
            if link >= <uint64_t>index or rows[link * NCOL + C_TYPE] == T_DIR \
                    or rows[link * NCOL + C_TYPE] == T_HARDLINK:
                r.err, r.value = E_LINK, link
                return index
            row[C_LINK] = <int64_t>link
            continue
        mode = _uv(r)
        if not r.err:
            uid = _uv(r)
        if not r.err:
            gid = _uv(r)
        if not r.err:
            z = _uv(r)
        if r.err:
            return index
        if mode > 0o7777 or uid > MAX_ID or gid > MAX_ID:
            r.err = E_OWNER
            return index
        row[C_MODE], row[C_UID], row[C_GID] = <int64_t>mode, <int64_t>uid, <int64_t>gid
        # zig-zag: even values are >= 0
        row[C_MTIME] = <int64_t>(z >> 1) if not z & 1 else -<int64_t>(z >> 1) - 1
        n = _uv(r)
        if r.err:
            return index
        if n > <uint64_t>((r.end - r.pos) // 2):
            r.err, r.value = E_XATTR_COUNT, n
            return index
        row[C_XATTR_OFF], row[C_NXATTR] = r.pos, <int64_t>n
        nx = <Py_ssize_t>n
        for k in range(nx):
            if _span(r, max_xattr_name, E_XATTR_LONG, &skipped) < 0 or \
                    _span(r, max_xattr_value, E_XATTR_LONG, &skipped) < 0:
                return index
        if t == T_FILE:
            size = _uv(r)
            if r.err:
                return index
            if size > MAX_FILE_SIZE:
                r.err, r.value = E_SIZE, size
                return index
            if r.end - r.pos < 32:
                r.err = E_TRUNCATED
                return index
            row[C_SIZE], row[C_DATA_OFF], row[C_DATA_LEN] = <int64_t>size, r.pos, 32
            r.pos += 32
        elif t == T_SYMLINK:
            start = _span(r, max_symlink, E_SYMLINK_LONG, &row[C_DATA_LEN])
            if r.err:
                return index
            row[C_DATA_OFF] = start
        elif t == T_CHARDEV or t == T_BLOCKDEV:
            major = _uv(r)
            if not r.err:
                minor = _uv(r)
            if r.err:
                return index
            if major > MAX_ID or minor > MAX_ID:
                r.err = E_DEVICE
                return index
            row[C_MAJOR], row[C_MINOR] = <int64_t>major, <int64_t>minor
    return count


def scan_tree(const uint8_t[::1] buf, Py_ssize_t pos, Py_ssize_t count, Py_ssize_t max_path,
              Py_ssize_t max_name, uint64_t max_xattr_name, uint64_t max_xattr_value,
              uint64_t max_symlink):
    """Scan `count` entries from buf[pos:].  Returns (rows, end, error, index, value):
    rows an int64 memoryview of shape (count, 16); error 0, or the code of the first
    problem, at entry `index`, with the offending `value` where there is one."""
    cdef Reader r
    # a plain int64 buffer: numpy is 10 MiB of every FUSE server's memory, and this is all it did here
    if count == 0:  # a shape with a zero cannot be cast
        return memoryview(bytearray()).cast("q"), pos, 0, 0, 0
    rows = memoryview(bytearray(8 * count * NCOL)).cast("q", (count, NCOL))
    cdef int64_t[:, ::1] view = rows
    cdef Py_ssize_t at
    r.buf = &buf[0] if buf.shape[0] else NULL
    r.pos, r.end, r.err, r.value = pos, buf.shape[0], 0, 0
    with nogil:
        at = _scan(&r, count, &view[0, 0], max_path, max_name, max_xattr_name, max_xattr_value,
                   max_symlink)
    return rows, r.pos, r.err, at, r.value

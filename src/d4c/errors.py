"""The one error tree of d4c.

Every error a user can cause (bad flags, bad input files, missing images) is a
`D4CError`.  The class docstring is the message template and the class carries
its exit code, so `d4c.cli.main()` can print one line and exit without knowing
the details.  Anything that is *not* a D4CError is a bug and shows a traceback.
"""

from __future__ import annotations

EXIT_OK = 0
EXIT_ERROR = 1          # generic failure
EXIT_USAGE = 2          # wrong flags (argparse uses 2 as well)
EXIT_CORRUPT = 3        # an input file is damaged, hostile or of an unknown version
EXIT_NOT_FOUND = 4      # a named input (file, image, tag) does not exist
EXIT_IO = 5             # the system refused (permissions, full disk, ...)
EXIT_UNSUPPORTED = 6    # valid input we do not handle (yet)
EXIT_UNREACHABLE = 7    # a server, registry or daemon that cannot be reached
EXIT_UNTRUSTED = 8      # --trust is set and the artifact is unsigned or signed by no trusted key
EXIT_UNAUTHORIZED = 9   # the server wants a token (or another one) for this
EXIT_INTERRUPTED = 130  # Ctrl-C
EXIT_TERMINATED = 143   # SIGTERM (128 + 15), cleaned up as for Ctrl-C
EXIT_BROKEN_PIPE = 141  # the reader of our output went away (128 + SIGPIPE)


class D4CError(Exception):
    """{}"""

    exit_code = EXIT_ERROR

    def message(self) -> str:
        doc = type(self).__doc__ or "{}"
        try:
            return doc.strip().format(*self.args)
        except (IndexError, KeyError, ValueError):
            return " ".join(str(a) for a in self.args)

    def __str__(self) -> str:
        return self.message()


class UsageError(D4CError):
    """{}"""

    exit_code = EXIT_USAGE


class CorruptImage(D4CError):
    """corrupt image {}: {}"""

    exit_code = EXIT_CORRUPT


class UnsupportedVersion(D4CError):
    """{}: format version {} is not supported by this d4c (it reads version {})"""

    exit_code = EXIT_CORRUPT


class BadInput(D4CError):
    """{}"""

    exit_code = EXIT_CORRUPT


class NotFound(D4CError):
    """{}"""

    exit_code = EXIT_NOT_FOUND


class AlreadyExists(D4CError):
    """{}"""

    exit_code = EXIT_ERROR


class Conflict(D4CError):
    """{}"""

    exit_code = EXIT_ERROR


class Unavailable(D4CError):
    """{}"""

    exit_code = EXIT_UNREACHABLE


class OutputExists(D4CError):
    """output {} already exists and is not empty"""

    exit_code = EXIT_USAGE


class SystemFailure(D4CError):
    """{}"""

    exit_code = EXIT_IO


class Unsupported(D4CError):
    """{}"""

    exit_code = EXIT_UNSUPPORTED


class Untrusted(D4CError):
    """refused: {}"""

    exit_code = EXIT_UNTRUSTED


class Unauthorized(D4CError):
    """{}"""

    exit_code = EXIT_UNAUTHORIZED


class ExtensionMismatch(D4CError):
    """the compiled kernels do not match this d4c ({}); rebuild with `make deps`"""

    exit_code = EXIT_ERROR


def from_oserror(exc: OSError, what: str) -> SystemFailure:
    """Turn an OSError into a one-line SystemFailure naming what we were doing."""
    reason = exc.strerror or str(exc)
    name = exc.filename
    if name is None or isinstance(name, int):  # an fd number says nothing to a user
        return SystemFailure(f"{what}: {reason}")
    if isinstance(name, bytes):
        name = name.decode(errors="replace")
    return SystemFailure(f"{what}: {name}: {reason}")


class CorruptDelta(D4CError):
    """corrupt delta {}: {}"""

    exit_code = EXIT_CORRUPT


class MissingBase(D4CError):
    """{} is a delta of image {}: give that image too (--baseCdimg or --baseDimg)"""

    exit_code = EXIT_NOT_FOUND


class WrongBase(D4CError):
    """{} is a delta of image {}, but {} is image {}"""

    exit_code = EXIT_CORRUPT


class WrongSource(D4CError):
    """{}: this delta applies to a different source ({})"""

    exit_code = EXIT_CORRUPT

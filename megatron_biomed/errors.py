"""How every entry point fails: one line `error: <file or flag>: <what is wrong>; <what to do>`
on stderr and a non-zero exit. A traceback only with `--debug` or MEGATRON_BIOMED_DEBUG=1.

Errors the user can fix subclass `UserError` (their message already names the file or flag).
Operating-system errors (disk full, read-only directory, missing file) name the file from the
exception itself; anything else is reported as unexpected, in one line, with how to see more.
"""
import errno
import functools
import os
import sys

DEBUG_ENV = "MEGATRON_BIOMED_DEBUG"
EXIT_FAILURE, EXIT_USAGE, EXIT_INTERRUPTED = 1, 2, 130


class UserError(Exception):
    """A failure the user can fix; `str(e)` names the input and says what to do."""
    exit_code = EXIT_FAILURE


class UsageError(UserError):
    """A bad flag or setting."""
    exit_code = EXIT_USAGE


def add_debug_flag(parser):
    parser.add_argument("--debug", action="store_true",
                        help=f"show Python tracebacks on failure (or set {DEBUG_ENV}=1)")
    return parser


def debug_enabled(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    return os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in [str(a) for a in argv]


_OS_ADVICE = {
    errno.ENOSPC: "no space left on the device; free space or write somewhere else",
    errno.EDQUOT: "disk quota exceeded; free space or write somewhere else",
    errno.EROFS: "the file system is read-only; choose a writable output location",
    errno.EACCES: "permission denied; choose a location you can write (or read)",
    errno.EPERM: "operation not permitted; choose a location you can write (or read)",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a path component is not a directory; check the path",
    errno.EISDIR: "is a directory, a file was expected; check the path",
    errno.EIO: "input/output error from the device; check the disk or file system",
}


def os_error_line(e):
    """'<file>: <what>; <what to do>' for an OSError."""
    where = e.filename if e.filename is not None else "(file system)"
    what = _OS_ADVICE.get(e.errno) or f"{e.strerror or e}; check the path and the file system"
    return f"{where}: {what}"


def find_os_error(e):
    """The OSError behind `e` (raised directly, chained, or wrapped by a library), if any."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno is not None:
            return x
        stack += [x.__cause__, x.__context__]
        # torch.distributed.checkpoint's CheckpointException: {rank: exception or (exception, tb)}
        for v in (getattr(x, "failures", None) or {}).values():
            stack.append(v[0] if isinstance(v, tuple) else v)
    return None


# Raised by our own code with a message that names the input (FileNotFoundError("no datasets in
# X")); the same types raised by a library with an errno are handled as OS errors above.
_PLAIN = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, UnicodeDecodeError)


def one_line(e):
    """The message of `e` as one line, without the leading 'error: '."""
    if isinstance(e, UserError) or (type(e) in _PLAIN and e.args and isinstance(e.args[0], str)
                                    and getattr(e, "errno", None) is None):
        text = str(e)
    else:
        os_err = find_os_error(e)
        if os_err is not None:
            text = os_error_line(os_err)
        else:
            text = (f"unexpected {type(e).__name__}: {e}; rerun with --debug (or {DEBUG_ENV}=1) "
                    f"for the traceback and report it")
    return " ".join(text.split())


def report(e, stream=None):
    print(f"error: {one_line(e)}", file=stream or sys.stderr, flush=True)
    return getattr(e, "exit_code", EXIT_FAILURE)


def entry_point(main):
    """Wrap a `main(argv=None) -> int`: every exception becomes one line and an exit code."""
    @functools.wraps(main)
    def wrapper(argv=None):
        from megatron_biomed.utils import follow_cpu_budget
        follow_cpu_budget()
        try:
            return main(argv)
        except SystemExit:
            raise
        except KeyboardInterrupt:
            if debug_enabled(argv):
                raise
            print("interrupted: nothing was written under the final output name", file=sys.stderr, flush=True)
            return EXIT_INTERRUPTED
        except BaseException as e:  # noqa: BLE001 - the one place where failures become a line
            # (torch.distributed.checkpoint's CheckpointException is a BaseException)
            if debug_enabled(argv) or isinstance(e, GeneratorExit):
                raise
            return report(e)
    return wrapper

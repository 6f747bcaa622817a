"""The ``flexolmo`` command line: one tool for the FlexOlmo lifecycle.

Exit codes: 0 success, 1 a check failed (e.g. parity above tolerance), 2 bad input or usage.

Every refusal is one ``error:`` line and exit 2: a bad option value (checked at parse time,
:mod:`.options`), input the library refuses (:class:`~flexolmo_plugin.errors.FlexOlmoError`), and a
file system that cannot take the output (disk full, read-only, no permission, the output appeared
meanwhile: :func:`describe_os_error`).  Every other exception is a bug and keeps its traceback.

* :mod:`.parser` -- the commands and their options (``build_parser``);
* :mod:`.commands` -- what each command does (imports its implementation when it runs);
* :mod:`.options` -- the parse-time checks of option values.
"""

from __future__ import annotations

import argparse
import errno
import os
import sys
import warnings
from pathlib import Path

from flexolmo_plugin.cli import options
from flexolmo_plugin.cli.commands import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, EXIT_OK
from flexolmo_plugin.cli.options import UsageError
from flexolmo_plugin.cli.parser import TRAIN_RECIPES, build_parser
from flexolmo_plugin.conversion.checksums import verification
from flexolmo_plugin.errors import FlexOlmoError, FlexOlmoWarning

__all__ = ["EXIT_BAD_INPUT", "EXIT_CHECK_FAILED", "EXIT_OK", "TRAIN_RECIPES", "build_parser", "describe_os_error",
           "environment_error", "main", "options", "run_command"]

# Failures of the machine or of the paths the user named, not of this program: reported on one
# line.  (EIO, EMFILE, ENOMEM, ... stay tracebacks: they are worth a bug report with the details.)
USER_ERRNOS = frozenset({
    errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTEMPTY,
    errno.EEXIST, errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG,
})
# Errors that only writing can cause: the path is named as "cannot write".
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})

# The argument holding each command's output, to name it when the OS error names no file (a
# failing write() on an open file carries no file name; neither does one torch's checkpoint writer
# reports).
OUTPUT_ARGUMENT = {
    "convert": "target", "upcycle": "out_dir", "prepare-data": "output_prefix", "embed-domain": "output",
    "select-proxy": "out", "calibrate-router": "out", "align-router": "out", "scale-router": "out", "router-mix": "out",
    "package-expert": "package_dir", "merge": "out", "opt-out": "out", "eval": "plot", "demo": "workdir",
    "keygen": "out", "generate": "out", "audit-extraction": "out",
}


def environment_error(error: BaseException) -> OSError | None:
    """The OS error behind ``error`` if that is all that went wrong, else None (a bug: traceback).

    Followed: ``raise ... from os_error`` and torch's ``CheckpointException``, which wraps what
    each rank's writer raised in ``failures`` (every failure must be such an error).  Not followed:
    an exception raised *while handling* an OS error (``__context__``), which is a bug of its own.
    """
    for _ in range(8):  # wrappers of wrappers, but never a cycle
        if isinstance(error, OSError):  # our own "does not exist"/"exists" messages carry no errno
            known = error.errno in USER_ERRNOS or isinstance(error, (FileNotFoundError, FileExistsError))
            return error if known else None
        failures = getattr(error, "failures", None)
        if isinstance(failures, dict) and failures:
            found = [environment_error(f[0] if isinstance(f, tuple) else f) for f in failures.values()]
            return found[0] if all(found) else None
        if error.__cause__ is None:
            return None
        error = error.__cause__
    return None


def describe_os_error(error: OSError, output: str | os.PathLike | None = None) -> str:
    """One line for an OS error: what failed, on which path, why -- and that nothing was written
    (every output of ours is written all-or-nothing and cleaned up before this is printed).

    ``output`` is the command's output path: it is named instead of our hidden temporaries beside
    it (``.NAME.partial-…``) and when the error names no file at all.
    """
    code = errno.errorcode.get(error.errno, str(error.errno))
    path = None if error.filename is None else os.fsdecode(error.filename)
    if output is not None:
        output = Path(output)
        if path is None or _is_part_of(Path(path), output):
            path = output
    if path is None:
        return f"{error.strerror} ({code}; nothing was written)"
    if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
        return f"{path} already exists; choose a new path ({code}; nothing was written)"
    what = "cannot write" if error.errno in WRITE_ERRNOS or path == output else "cannot access"
    return f"{what} {path}: {error.strerror} ({code}; nothing was written)"


def _is_part_of(path: Path, output: Path) -> bool:
    """``path`` is the output, inside it, or (inside) one of its hidden temporaries."""
    for candidate in (path, *path.parents):
        if candidate == output or (candidate.parent == output.parent
                                   and candidate.name.startswith(f".{output.name}")
                                   and ".partial" in candidate.name):
            return True
    return False


def _show_flexolmo_warnings(default):
    """Our own warnings (:class:`~flexolmo_plugin.errors.FlexOlmoWarning`) as one ``warning:`` line each;
    other warnings as before."""
    def show(message, category, filename, lineno, file=None, line=None):
        if issubclass(category, FlexOlmoWarning):
            print(f"warning: {message}", file=sys.stderr)
        else:
            default(message, category, filename, lineno, file, line)
    return show


def main(argv: list[str] | None = None) -> int:
    """Run one command.  A refusal of the user's input -- a bad option value, a
    :class:`~flexolmo_plugin.errors.FlexOlmoError`, a path that does not exist / already exists, a
    file system that cannot take the output -- prints one line and exits 2; anything else is a bug
    and propagates with its traceback (a non-zero exit that is never reported as bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return run_command(args)


def run_command(args: argparse.Namespace) -> int:
    """Run the parsed command ``args.func``, turning refusals into one ``error:`` line and exit 2."""
    try:
        with verification(not getattr(args, "no_verify", False)), warnings.catch_warnings():
            warnings.showwarning = _show_flexolmo_warnings(warnings.showwarning)
            return args.func(args)
    except FlexOlmoError as error:
        print(f"error: {error}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BaseException as error:  # torch's CheckpointException is a BaseException, not an Exception
        os_error = environment_error(error)
        if os_error is None:
            raise
        if os_error.errno is None or os_error.strerror is None:  # one of our own messages
            print(f"error: {os_error}", file=sys.stderr)
        else:
            output = getattr(args, OUTPUT_ARGUMENT.get(args.command, ""), None)
            print(f"error: {describe_os_error(os_error, output)}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())

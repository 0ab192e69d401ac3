"""The one user-facing error type.

A :class:`UserError` is something the user can fix: a wrong path, a bad flag, a target the model cannot
reach. The CLI prints it as one line (what, where, how to fix) and exits with code 2, without a traceback.
Anything else that escapes is a bug in minitron and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator

EXIT_USER_ERROR = 2


class UserError(Exception):
    """A mistake in the user's input, reported as one line and exit code 2.

    Args:
        what: what is wrong, e.g. ``"no config.json"``.
        where: the path, flag or key it concerns, e.g. ``"--calib /data/x.txt"``.
        fix: how to put it right, e.g. ``"pass a folder written by save_pretrained"``.
    """

    def __init__(self, what: str, where: str | None = None, fix: str | None = None):
        self.what, self.where, self.fix = what, where, fix
        super().__init__(self.line())

    def line(self) -> str:
        parts = [self.what if self.where is None else f"{self.where}: {self.what}"]
        if self.fix:
            parts.append(self.fix)
        # One line, always: a newline inside a message would break log parsers and the contract.
        return " — ".join(p.replace("\n", " ") for p in parts)


def disk_full(error: BaseException) -> bool:
    """Whether ``error`` says the disk or the user's quota is full: an ``OSError`` with ENOSPC or EDQUOT, or a
    library's own error that carries the system's words for them (safetensors' writer raises
    ``SafetensorError("... No space left on device (os error 28)")``, torch's ``RuntimeError`` likewise)."""
    import errno
    import os

    codes = (errno.ENOSPC, errno.EDQUOT)
    if isinstance(error, OSError) and error.errno in codes:
        return True
    return isinstance(error, Exception) and any(os.strerror(code) in str(error) for code in codes)


def full_disk_error(error: BaseException) -> UserError | None:
    """The one line for an error that filled the disk outside minitron's own writers (a checkpoint, a cache),
    else None. Whatever was being written is removed by the code that made it."""
    if not disk_full(error):
        return None
    where = getattr(error, "filename", None)
    return UserError("the disk filled up while writing", where=None if where is None else str(where),
                     fix="free some space or choose another disk, and run again")  # fmt: skip


def run_script(main: Callable[[], None]) -> None:
    """Entry point of a repository script (``scripts/``, ``benchmarks/``), reporting as the CLI does: a
    :class:`UserError` becomes one line on stderr and exit code 2; Ctrl-C and SIGTERM unwind (the script's
    ``finally`` blocks remove its temporary work) and exit 130 and 143 with one line; anything else keeps
    its traceback."""
    try:
        with interrupt_on_signals():
            main()
    except UserError as e:
        print(f"error: {e.line()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except Interrupted as e:
        print(f"interrupted ({e})", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception as e:
        full = full_disk_error(e)
        if full is None:
            raise
        print(f"error: {full.line()}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) or SIGTERM (``kill``, a batch scheduler's time limit, ``torchrun`` stopping its
    workers), raised where the process is so that it unwinds: every temporary output is removed by the code
    that made it. Exit code 128 + the signal: 130 and 143, as shells report them.

    Not a ``KeyboardInterrupt``: the CLI framework turns that into a silent exit, and libraries catch it.
    """

    def __init__(self, signum: int):
        import signal

        self.signum, self.exit_code = signum, 128 + signum
        super().__init__(signal.Signals(signum).name)


@contextlib.contextmanager
def interrupt_on_signals() -> Iterator[None]:
    """While in the block, SIGINT and SIGTERM raise :class:`Interrupted`; the previous handlers come back
    after it (the CLI may run inside another program, e.g. a test). Outside the main thread, which alone
    can install handlers, this changes nothing."""
    import signal
    import threading

    def raise_interrupted(signum, frame):
        raise Interrupted(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.signal(signum, raise_interrupted) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)

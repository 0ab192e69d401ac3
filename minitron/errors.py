"""The one user-facing error type.

A :class:`UserError` is something the user can fix: a wrong path, a bad flag, a target the model cannot
reach. The CLI prints it as one line (what, where, how to fix) and exits with code 2, without a traceback.
Anything else that escapes is a bug in minitron and keeps its traceback.
"""

from __future__ import annotations

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


EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C
EXIT_TERMINATED = 143  # 128 + SIGTERM


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so that it unwinds exactly as Ctrl-C does: every temporary
    output is removed by the code that made it, and the exit code is 143 instead of 130."""


def terminate_as_interrupt() -> None:
    """Make SIGTERM (``kill``, a batch scheduler's time limit, ``torchrun`` stopping its workers) clean up
    like Ctrl-C. Only the main thread can install handlers; elsewhere this does nothing."""
    import signal
    import threading

    def raise_terminated(signum, frame):
        raise Terminated()

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, raise_terminated)

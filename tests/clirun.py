"""Running ``minitron`` the way a user does, and the CLI's contract for user errors.

:func:`minitron` runs a real process (``python -m minitron.cli``); :func:`minitron_in_process` calls the same
entry point, ``minitron.cli.main``, inside the test process, which saves the interpreter start and imports
(seconds each) for the many rows of tests/test_bad_inputs.py.
"""

import contextlib
import io
import os
import subprocess
import sys
import traceback
from unittest import mock


def minitron(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m minitron.cli ARGS`` with captured output."""
    # One intra-op thread: the CI machine's two cores are shared by two test processes, and oversubscribed
    # OpenMP threads slow tiny models down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "minitron.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip


def minitron_in_process(*args) -> subprocess.CompletedProcess:
    """``minitron ARGS`` through ``minitron.cli.main`` in this process, as a CompletedProcess: the exit code
    it passes to ``sys.exit``, and what it printed. An exception that escapes ``main`` is what a user would
    see as a traceback: it comes back as exit code 1 with the traceback on stderr."""
    import signal

    from minitron import cli

    handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    out, err = io.StringIO(), io.StringIO()
    argv = ["minitron", *map(str, args)]
    with mock.patch.object(sys, "argv", argv), contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:  # noqa: BLE001  (a crash is a result here, reported like the process would)
            err.write(traceback.format_exc())
            code = 1
        finally:
            for signum, handler in handlers.items():  # main() installs its own; the test process keeps pytest's
                signal.signal(signum, handler)
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def assert_user_error(result: subprocess.CompletedProcess, *needles: str, code: int = 2) -> None:
    """Exit code 2, one line on stderr holding every needle, no traceback."""
    assert result.returncode == code, result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]

"""Running ``minitron`` the way a user does (a subprocess), and the CLI's contract for user errors."""

import os
import subprocess
import sys


def minitron(*args, cwd=None, timeout=600) -> subprocess.CompletedProcess:
    """``python -m minitron.cli ARGS`` with captured output."""
    # One intra-op thread: the CI machine's two cores are shared by two test processes, and oversubscribed
    # OpenMP threads slow tiny models down many times over.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "minitron.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
    )  # fmt: skip


def assert_user_error(result: subprocess.CompletedProcess, *needles: str) -> None:
    """Exit code 2, one line on stderr holding every needle, no traceback."""
    assert result.returncode == 2, result.stderr + result.stdout
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]

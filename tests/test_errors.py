"""Ctrl-C and SIGTERM in the command line: they unwind as an exception of their own (not KeyboardInterrupt,
which the CLI framework swallows), exit 128 + the signal with one line, and leave the caller's handlers."""

import os
import signal
import sys

import pytest

from minitron import cli, inputs
from minitron.errors import Interrupted, UserError, interrupt_on_signals, run_script


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_exits_with_its_code_and_one_line(monkeypatch, capsys, signum, code):
    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signum)
        raise AssertionError("the signal should have interrupted the verb")

    monkeypatch.setattr(inputs, "load_config", interrupted)
    monkeypatch.setattr(sys, "argv", ["minitron", "inspect", "some-model"])
    before = signal.getsignal(signum)
    with pytest.raises(SystemExit) as e:
        cli.main()
    assert e.value.code == code
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and signal.Signals(signum).name in err[0] and "interrupted" in err[0]
    assert signal.getsignal(signum) is before  # the caller's handler is back


def test_cleanup_code_sees_the_interruption_as_a_base_exception():
    with pytest.raises(Interrupted) as e, interrupt_on_signals():
        try:
            os.kill(os.getpid(), signal.SIGTERM)
        except Exception:  # noqa: BLE001 - what a careless `except Exception` would do: not catch it
            pytest.fail("Interrupted must not be an Exception")
    assert e.value.exit_code == 143 and not isinstance(e.value, KeyboardInterrupt)


def _script_exit(capsys, main) -> tuple[int, list[str]]:
    with pytest.raises(SystemExit) as e:
        run_script(main)
    return e.value.code, capsys.readouterr().err.strip().splitlines()


def test_a_script_reports_a_user_error_in_one_line(capsys):
    def main():
        raise UserError("no such file or folder", where="--teacher /x", fix="pass a checkpoint folder")

    code, err = _script_exit(capsys, main)
    assert code == 2 and err == ["error: --teacher /x: no such file or folder — pass a checkpoint folder"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_script_unwinds_on_a_signal_so_its_cleanup_runs(capsys, tmp_path, signum, code):
    scratch = tmp_path / "scratch"
    before = signal.getsignal(signum)

    def main():
        scratch.mkdir()
        try:
            os.kill(os.getpid(), signum)
            raise AssertionError("the signal should have interrupted the script")
        finally:
            scratch.rmdir()

    exit_code, err = _script_exit(capsys, main)
    assert exit_code == code and not scratch.exists()
    assert len(err) == 1 and signal.Signals(signum).name in err[0] and "interrupted" in err[0]
    assert signal.getsignal(signum) is before

"""Writing outputs: the destination is checked first, results appear whole or not at all with the user's
umask, and the temporary siblings of a killed writer are cleaned up by the next one (never a live one's)."""

import errno
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from minitron.artifacts import atomic_dir, atomic_file, check_output_dir, clear_leftovers, sibling
from minitron.errors import UserError


def dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


def left_by(pid: int, out: Path, kind: str) -> Path:
    """A sibling named as the writer with ``pid`` on this machine names it."""
    return out.with_name(sibling(out, kind).name.replace(f"-{os.getpid()}-", f"-{pid}-"))


@pytest.fixture
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_outputs_get_the_users_umask_not_0700(tmp_path, umask_022):
    with atomic_dir(tmp_path / "ckpt") as tmp:
        (tmp / "w.bin").write_bytes(b"x")
        save_file({"w": torch.zeros(2)}, tmp / "model.safetensors")  # safetensors itself writes 0600
        (tmp / "sub").mkdir(mode=0o700)
    with atomic_file(tmp_path / "scores.safetensors") as tmp:
        save_file({"w": torch.zeros(2)}, tmp)
    assert stat.S_IMODE((tmp_path / "ckpt").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "sub").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "ckpt" / "w.bin").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "ckpt" / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "scores.safetensors").stat().st_mode) == 0o644


def test_a_failed_write_leaves_nothing_and_an_overwrite_keeps_the_old_until_done(tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "half").write_bytes(b"x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(out) as tmp:
        (tmp / "v").write_text("1")
    with pytest.raises(RuntimeError), atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
        raise RuntimeError("killed")
    assert (out / "v").read_text() == "1" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]
    with atomic_dir(out, overwrite=True) as tmp:
        (tmp / "v").write_text("2")
    assert (out / "v").read_text() == "2" and [p.name for p in tmp_path.iterdir()] == ["ckpt"]


def test_siblings_of_a_dead_writer_are_removed_with_a_note_those_of_a_live_one_kept(tmp_path, capsys):
    out = tmp_path / "pruned"
    dead = left_by(dead_pid(), out, "tmp")
    dead.mkdir()
    (dead / "model.safetensors").write_bytes(b"half")
    live = left_by(os.getppid(), out, "tmp")  # pytest's parent: alive for as long as this test runs
    live.mkdir()
    other_host = tmp_path / f".pruned.tmp-{dead_pid()}-00000000-ab"  # another machine's writer: unknown
    other_host.mkdir()
    unrelated = tmp_path / ".pruned-notes.tmp-1-2-3"
    unrelated.mkdir()

    with atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["pruned", live.name, other_host.name, unrelated.name])
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith("note: removed") and dead.name in note[0]


def test_an_output_killed_while_being_replaced_is_put_back(tmp_path, capsys):
    out = tmp_path / "report"
    old = left_by(dead_pid(), out, "old")  # killed between moving the old aside and renaming the new in
    old.mkdir()
    (old / "leaderboard.md").write_text("old")
    assert clear_leftovers(out) == [old]
    assert (out / "leaderboard.md").read_text() == "old" and not old.exists()
    assert "restored" in capsys.readouterr().err


@pytest.mark.parametrize("where", ["below a file", "kernel file system", "read-only folder"])
def test_an_output_that_cannot_be_created_is_refused_before_any_work(tmp_path, where):
    if where == "below a file":
        (tmp_path / "file.txt").write_text("x")
        out, words = tmp_path / "file.txt" / "sub" / "out.json", "is a file, not a folder"
    elif where == "kernel file system":  # nobody, root included, creates files in /proc
        out, words = Path("/proc/self/out.json"), "cannot write here"
    else:
        if os.geteuid() == 0:
            pytest.skip("root ignores permission bits")
        (tmp_path / "ro").mkdir(mode=0o555)
        out, words = tmp_path / "ro" / "out.json", "cannot write here"
    with pytest.raises(UserError, match=words):
        check_output_dir(out, overwrite=False)


def test_too_little_free_space_is_refused_when_the_size_is_known(tmp_path):
    with pytest.raises(UserError, match="not enough free space"):
        check_output_dir(tmp_path / "ckpt", overwrite=False, size=10**18)
    assert check_output_dir(tmp_path / "ckpt", overwrite=False, size=1) == tmp_path / "ckpt"


def test_overwrite_never_replaces_a_file_by_a_folder_or_a_folder_by_a_file(tmp_path):
    scores, checkpoint = tmp_path / "scores.safetensors", tmp_path / "student"
    scores.write_bytes(b"scores")
    checkpoint.mkdir()
    (checkpoint / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match="is a file; --overwrite replaces it only with a file, and this writes a folder"):
        with atomic_dir(scores, overwrite=True):
            pass
    with pytest.raises(UserError, match="is a folder; --overwrite replaces it only with a folder"):
        with atomic_file(checkpoint, overwrite=True):
            pass
    assert scores.read_bytes() == b"scores" and (checkpoint / "model.safetensors").read_bytes() == b"weights"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scores.safetensors", "student"]


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
     RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")],
    ids=["ENOSPC", "EDQUOT", "safetensors"],
)
def test_a_result_that_fills_the_disk_is_one_line_and_leaves_nothing(tmp_path, error):
    for writer, out in ((atomic_dir, tmp_path / "student"), (atomic_file, tmp_path / "scores.safetensors")):
        with pytest.raises(UserError, match="the disk filled up.*free some space on"), writer(out) as tmp:
            (tmp / "half" if tmp.is_dir() else tmp).write_bytes(b"half")
            raise error
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="killed"), atomic_dir(tmp_path / "student"):
        raise RuntimeError("killed")  # any other failure keeps its own error


def test_a_failed_write_removes_the_folders_it_created_above_the_output(tmp_path):
    for writer in (atomic_dir, atomic_file):
        with pytest.raises(RuntimeError), writer(tmp_path / "runs" / "a" / "out"):
            raise RuntimeError("killed")
        assert list(tmp_path.iterdir()) == []
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "keep.txt").write_text("mine")
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "runs" / "a" / "out"):
        raise RuntimeError("killed")
    assert [p.name for p in (tmp_path / "runs").iterdir()] == ["keep.txt"]
    with atomic_dir(tmp_path / "runs" / "a" / "out") as tmp:
        (tmp / "v").write_text("1")
    assert (tmp_path / "runs" / "a" / "out" / "v").read_text() == "1"


def test_overwrite_never_replaces_a_link_a_device_or_an_input_and_an_output_must_have_a_name(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    with pytest.raises(UserError, match="symbolic link"):
        check_output_dir(tmp_path / "link", overwrite=True)
    with pytest.raises(UserError, match="already exists"):  # a dangling link exists too
        check_output_dir(tmp_path / "dangling", overwrite=False)
    with pytest.raises(UserError, match="neither a file nor a folder"):
        check_output_dir(Path("/dev/null"), overwrite=True, folder=False)
    teacher = tmp_path / "real" / "teacher"
    teacher.mkdir()
    with pytest.raises(UserError, match="would delete an input: the output is --teacher"):
        check_output_dir(teacher, overwrite=True, inputs=[("--teacher", teacher), ("--scores", None)])
    with pytest.raises(UserError, match="would delete an input: the output holds --teacher"):
        check_output_dir(tmp_path / "real", overwrite=True, inputs=[("--teacher", teacher)])
    (teacher / "config.json").write_text("{}")
    with pytest.raises(UserError, match="would delete an input: the output lies inside --teacher"):
        check_output_dir(teacher / "config.json", overwrite=True, folder=False, inputs=[("--teacher", teacher)])
    assert check_output_dir(teacher / "new.json", overwrite=True, folder=False, inputs=[("--teacher", teacher)])
    assert check_output_dir(tmp_path / "real", overwrite=True, inputs=[("--teacher", "org/hub-id")]) == tmp_path / "real"
    monkeypatch.chdir(tmp_path / "real")
    for nameless in ("", ".", "..", "teacher/.."):
        with pytest.raises(UserError, match="names no file or folder"):
            check_output_dir(nameless, overwrite=True)


def test_a_name_too_long_for_the_file_system_is_refused_before_any_work(tmp_path):
    with pytest.raises(UserError, match="name too long: 240 bytes"):
        check_output_dir(tmp_path / ("c" * 240), overwrite=False)  # fine alone, too long as .c….tmp-…
    with pytest.raises(UserError, match="name too long: 300 bytes"):
        check_output_dir(tmp_path / ("d" * 300) / "out", overwrite=False)
    assert check_output_dir(tmp_path / ("c" * 200), overwrite=False)
    assert list(tmp_path.iterdir()) == []

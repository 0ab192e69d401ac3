"""Writing artifacts safely: everything goes to a temporary sibling and is renamed into place at the end,
so an interrupted or failed run never leaves a half-written checkpoint, scores file or report behind.

Three promises live here, for every verb:

* **The destination is checked first** (:func:`check_output_dir`): an existing output is refused unless
  overwritten, the nearest existing ancestor must be a writable folder, and where the caller knows the size
  of the result, the free space must hold it. All of it before any computation.
* **Nothing half-written is ever visible** (:func:`atomic_dir`, :func:`atomic_file`): the result is built in
  ``.<name>.tmp-<pid>-<host>-<random>`` beside the output and renamed onto it at the end; a replaced output
  is moved aside to ``.<name>.old-<pid>-<host>-<random>`` for the instant of the swap.
* **A killed run's siblings are cleaned up** (:func:`clear_leftovers`): ``kill -9`` runs no cleanup code, so
  the next run that writes the same output removes the siblings whose process is gone (one ``note:`` line
  each). The pid and a hash of the host name in the name tell a dead writer from a live one: a sibling of a
  run still in progress (here, or on another machine sharing the folder) is never touched.

Files and folders get the user's umask (0755/0644 typically), like any other tool's: teams share checkpoints
(:func:`give_umask`, also for files that a library wrote with 0600).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import re
import secrets
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from minitron.errors import UserError, disk_full

# Room left on top of the known size: file-system blocks, headers, the model card and config beside weights.
_SPACE_MARGIN = 1.02
_SIBLING = re.compile(r"\.(?P<kind>tmp|old)-(?P<pid>\d+)-(?P<host>[0-9a-f]{8})-[0-9a-f]+")


def note(message: str) -> None:
    """One ``note:`` line on stderr: something the user should know that is not an error."""
    print(f"note: {message}", file=sys.stderr, flush=True)


# --- the destination, checked before any work ------------------------------------------------------------------


def check_output_dir(
    out: str | Path, overwrite: bool, *, size: int | None = None, folder: bool = True,
    inputs: Iterable[tuple[str, str | Path | None]] = (),
) -> Path:  # fmt: skip
    """Refuse an output that cannot be written, before any expensive work starts.

    Refused: a path that names no file or folder (``""``, ``.``, ``..``); an existing ``out`` unless
    ``overwrite``, and even then a symbolic link, something that is neither a file nor a folder (a device),
    a file where the result is a folder or the reverse (``--overwrite`` replaces an earlier result, never a
    folder of other things), and one of the run's own ``inputs`` (``(flag, path)`` pairs) or a folder holding one;
    a path below a file, a folder this process cannot create files in (read-only mount, permissions), a name
    too long for the file system, and, given ``size`` (bytes of the result), too little free space.
    Returns ``out`` as a :class:`~pathlib.Path`.
    """
    out = Path(out)
    if out.name in ("", ".", ".."):
        raise UserError("names no file or folder to write", where=repr(str(out)), fix="name the output, e.g. -o runs/out")
    clear_leftovers(out)
    if _exists(out):
        if not overwrite:
            raise UserError("output already exists", where=str(out), fix="choose another path or pass --overwrite")
        _check_replaceable(out, folder, inputs)
    check_writable(out, size=size)
    return out


def _check_replaceable(out: Path, folder: bool, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """What ``--overwrite`` may not replace (see :func:`check_output_dir`)."""
    fix = "choose another path, or remove it yourself first"
    if out.is_symlink():
        raise UserError("output is a symbolic link; --overwrite does not replace links", where=str(out),
                        fix=f"write to the path it points to ({os.path.realpath(out)}), or remove the link")  # fmt: skip
    if not out.is_dir() and not out.is_file():
        raise UserError("output exists and is neither a file nor a folder (a device or a pipe?)", where=str(out),
                        fix=fix)  # fmt: skip
    if out.is_dir() != folder:
        found, wanted = ("a folder", "a file") if out.is_dir() else ("a file", "a folder")
        raise UserError(f"output exists and is {found}; --overwrite replaces it only with {found}, and this writes "
                        f"{wanted}", where=str(out), fix=fix)  # fmt: skip
    clash = deleted_input(out, inputs)
    if clash:
        raise UserError(f"--overwrite would delete an input: the output {clash}", where=str(out),
                        fix="write the result somewhere else")  # fmt: skip


def deleted_input(out: Path, inputs: Iterable[tuple[str, str | Path | None]]) -> str | None:
    """``"is FLAG PATH"``, ``"holds FLAG PATH"`` or ``"lies inside FLAG PATH"`` for the first local input that
    replacing ``out`` would delete or change; None if there is none (hub ids and absent inputs are skipped).
    Inside an input folder anything may belong to the input (a model's config.json or weights, a data file
    of --calib or --data-dir), so nothing there is replaced."""
    target = out.resolve()
    for flag, given in inputs:
        if given is None or not Path(given).exists():
            continue
        path = Path(given).resolve()
        if path == target or target in path.parents:
            return f"{'is' if path == target else 'holds'} {flag} {given}"
        if path in target.parents:
            return f"lies inside {flag} {given}"
    return None


def check_writable(out: str | Path, *, size: int | None = None) -> None:
    """Refuse ``out`` if it could not be created: a path below a file, a folder this process cannot create
    files in (read-only mount, permissions), or, given ``size`` in bytes, too little free space."""
    out = Path(out)
    base = _nearest_existing(out.parent)
    _check_name_lengths(out, base)
    if not base.is_dir():
        raise UserError(
            f"cannot create {out.name}: {base} is a file, not a folder", where=str(out), fix="choose another path"
        )
    if not _can_create_in(base):
        raise UserError(
            "cannot write here (read-only file system or no permission)", where=str(base),
            fix="choose a folder you can write to",
        )  # fmt: skip
    if size:
        free = shutil.disk_usage(base).free
        # Overwriting frees the old output only after the new one is complete: it does not count as free.
        if free < size * _SPACE_MARGIN:
            raise UserError(
                f"not enough free space: the result needs about {_gb(size * _SPACE_MARGIN)}, {_gb(free)} free",
                where=str(base), fix="free some space or choose another disk",
            )  # fmt: skip


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not _exists(path) and path != path.parent:
        path = path.parent
    return path


def _exists(path: Path) -> bool:
    try:
        return path.exists() or path.is_symlink()
    except OSError:  # a name too long to look up: nothing of that name can exist
        return False


def _check_name_lengths(out: Path, base: Path) -> None:
    """Refuse a name the file system cannot hold: the output's temporary siblings' (its longest: ``.NAME.old-…``)
    or a folder's to be made on the way; found now, not when the result is written."""
    if not base.is_dir():
        return
    try:
        limit = os.pathconf(base, "PC_NAME_MAX")
    except (OSError, ValueError):
        return
    for part in out.absolute().relative_to(base).parts[:-1]:
        if len(os.fsencode(part)) > limit:
            raise UserError(f"name too long: {len(os.fsencode(part))} bytes, this file system allows {limit}",
                            where=part, fix="choose a shorter name")  # fmt: skip
    name, longest = len(os.fsencode(out.name)), len(os.fsencode(sibling(out, "old").name))
    if longest > limit:
        raise UserError(f"name too long: {name} bytes, and this file system allows {limit - (longest - name)} for "
                        "an output (its temporary name is longer)", where=str(out), fix="choose a shorter name")  # fmt: skip


def _can_create_in(folder: Path) -> bool:
    # Trying is the only test that holds for root (who ignores permission bits but not a read-only mount),
    # ACLs and network file systems alike. An unnamed temporary file (O_TMPFILE on Linux) leaves no trace.
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def _gb(size: float) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 1e8 else f"{size / 1e6:.1f} MB"


# --- temporary siblings ----------------------------------------------------------------------------------------


def _host() -> str:
    return hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]


def sibling(out: Path, kind: str) -> Path:
    """A fresh hidden name beside ``out`` that records who made it: ``.<name>.<kind>-<pid>-<host>-<random>``."""
    return out.with_name(f".{out.name}.{kind}-{os.getpid()}-{_host()}-{secrets.token_hex(4)}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clear_leftovers(out: str | Path) -> list[Path]:
    """Remove the temporary siblings of ``out`` whose writer is dead; put back an ``.old-`` one if ``out`` is
    missing (the writer died in the middle of replacing it). Returns what was removed or restored."""
    out = Path(out)
    prefix = f".{out.name}."
    try:
        entries = [p for p in out.parent.iterdir() if p.name.startswith(prefix)]
    except OSError:  # no parent yet, or not a folder: nothing of ours can be there
        return []
    found = []
    for path in sorted(entries):
        match = _SIBLING.fullmatch(path.name[len(prefix) - 1 :])
        if match is None or match["host"] != _host():
            continue  # not ours, or written from another machine: its pid means nothing here
        pid = int(match["pid"])
        if pid == os.getpid() or _alive(pid):
            continue
        if match["kind"] == "old" and not out.exists() and not out.is_symlink():
            os.replace(path, out)
            note(f"restored {out} from {path.name}, left by a run (pid {pid}) killed while replacing it")
        else:
            _remove(path)
            note(f"removed {path.name} beside {out}: left by a run (pid {pid}) that was killed")
        found.append(path)
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _new_dir(out: Path) -> Path:
    tmp = sibling(out, "tmp")
    tmp.mkdir()  # the umask applies (tempfile.mkdtemp would make it 0700)
    return tmp


def _new_file(out: Path) -> Path:
    tmp = sibling(out, "tmp")
    # O_EXCL as mkstemp, but mode 0666 less the umask instead of mkstemp's 0600.
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    return tmp


def _swap_in(tmp: Path, out: Path) -> None:
    if not out.is_dir() or out.is_symlink():
        os.replace(tmp, out)  # atomic by itself (a file, a link, or nothing yet)
        return
    # A folder cannot be renamed over a folder: the old one is moved aside first. Ctrl-C or SIGTERM wait
    # until the swap is done and the old one removed, so that only kill -9 can fall in between (and
    # clear_leftovers mends that on the next run).
    old = sibling(out, "old")
    with _signals_held():
        os.replace(out, old)
        try:
            os.replace(tmp, out)
        except BaseException:
            os.replace(old, out)
            raise
        _remove(old)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    held = {signal.SIGINT, signal.SIGTERM}
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, held)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False, *, size: int | None = None) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed."""
    with _atomic(check_output_dir(out, overwrite, size=size), _new_dir) as tmp:
        yield tmp


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; renamed onto ``out`` on success, removed on error."""
    with _atomic(check_output_dir(out, overwrite, folder=False), _new_file) as tmp:
        yield tmp


@contextlib.contextmanager
def _atomic(out: Path, new: Callable[[Path], Path]) -> Iterator[Path]:
    """The body of :func:`atomic_dir` and :func:`atomic_file` once ``out`` is checked: the temporary made by
    ``new`` is given the umask's modes and swapped in; on any failure it and the folders made above ``out``
    are removed, and a full disk becomes a :class:`UserError`."""
    made = _make_parents(out)
    try:
        tmp = new(out)
        try:
            yield tmp
            give_umask(tmp)
            _swap_in(tmp, out)
        except BaseException:
            _remove(tmp)
            raise
    except BaseException as e:
        _remove_made(made)
        _refuse_if_disk_full(e, out)
        raise


def umask() -> int:
    """The process's umask, read without changing it where Linux allows (``os.umask`` can only be read by
    setting it, which another thread creating a file at that instant would see)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def give_umask(path: Path) -> None:
    """Give ``path`` and everything below it the modes the umask gives a newly created file or folder.
    Writers that go through a private temporary file of their own (safetensors' ``save_file``, hence
    ``save_pretrained``) leave 0600, which would keep a shared checkpoint from the rest of a team."""
    mask = umask()

    def give(file: Path) -> None:  # links are left alone: only what the writer made here changes mode
        if not file.is_symlink():
            os.chmod(file, (0o777 if file.stat().st_mode & 0o111 else 0o666) & ~mask)

    if path.is_dir() and not path.is_symlink():
        for folder, _, files in os.walk(path):  # os.walk does not descend into a linked folder
            os.chmod(folder, 0o777 & ~mask)
            for name in files:
                give(Path(folder) / name)
    else:
        give(path)


def _make_parents(out: Path) -> list[Path]:
    """Create the missing folders above ``out``; returns them, deepest first, for :func:`_remove_made`."""
    parent = out.parent.absolute()
    missing = [parent, *parent.parents][: len(parent.parts) - len(_nearest_existing(parent).parts)]
    parent.mkdir(parents=True, exist_ok=True)
    return missing


def _remove_made(made: list[Path]) -> None:
    """After a failed write, remove the folders :func:`_make_parents` created, if nothing else came into them."""
    for folder in made:
        with contextlib.suppress(OSError):
            folder.rmdir()


def _refuse_if_disk_full(error: BaseException, out: Path) -> None:
    """A result that filled its disk (space or quota) is the user's to fix: one line, not a traceback. Its
    temporary sibling is gone by now; the space it took is free again."""
    if disk_full(error):
        raise UserError(
            "the disk filled up while this was being written; nothing was left behind", where=str(out),
            fix=f"free some space on {_nearest_existing(out.parent)} or choose another disk, and run again",
        ) from None  # fmt: skip


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on, for lineage records."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("minitron", "torch", "transformers", "accelerate", "datasets", "lm_eval"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found

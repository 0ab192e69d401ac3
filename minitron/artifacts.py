"""Writing artifacts safely: everything goes to a temporary sibling and is renamed into place at the end,
so an interrupted or failed run never leaves a half-written checkpoint, scores file or report behind."""

from __future__ import annotations

import contextlib
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from minitron.errors import UserError


def check_output_dir(out: str | Path, overwrite: bool) -> Path:
    """Refuse an existing output unless ``overwrite``; called before any expensive work starts."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError("output already exists", where=str(out), fix="choose another path or pass --overwrite")
    return out


@contextlib.contextmanager
def atomic_dir(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``out``; on success it replaces ``out``, on error it is removed."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            # Move the old one aside first so that no moment exists without a complete artifact.
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink(missing_ok=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary file path beside ``out``; renamed onto ``out`` on success, removed on error."""
    out = check_output_dir(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{out.name}.tmp-", dir=out.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def versions() -> dict[str, str]:
    """Versions of the libraries whose behaviour an artifact depends on, for lineage records."""
    import importlib.metadata as md

    found = {"python": platform.python_version()}
    for name in ("minitron", "torch", "transformers", "accelerate", "datasets", "lm_eval"):
        with contextlib.suppress(md.PackageNotFoundError):
            found[name] = md.version(name)
    return found

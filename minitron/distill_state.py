"""The run folder and checkpoints of a ``minitron distill`` run (:mod:`minitron.distill`).

The folder is decided before anything expensive (:func:`check_run_dir`, which writes nothing) and created
only once everything that can be refused has been (:func:`prepare_run_dir`), so a refused run leaves nothing
that would block its corrected rerun. Checkpoints are atomic (written to a temporary folder, renamed into
place when complete) and hold the model, optimizer, scheduler, RNG of every process and the data position,
so that a resume continues exactly; ``metrics.jsonl`` (:class:`Metrics`) is cut back to the resumed step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from minitron.artifacts import atomic_file, give_umask
from minitron.distill_data import World, barrier
from minitron.errors import UserError
from minitron.recipe import Recipe, load_recipe

if TYPE_CHECKING:
    from minitron.distill import Distiller

FINAL = "final"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
# Keys of a recipe that may change between a run and its resume: they do not change what is computed.
_RESUMABLE_CHANGES = ("eval", "checkpoint", "output")
# Optimizer keys that may change on resume: what a user lowers or raises to recover from divergence. They
# apply from the resumed step on (the schedule is recomputed with them) and are recorded in metrics.jsonl.
_RESUMABLE_OPTIMIZER = ("lr", "min_lr", "warmup_steps", "schedule", "weight_decay", "grad_clip")


# --- checkpoints ------------------------------------------------------------------------------------------------


def _state_options(world: World, **extra):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    # Full (gathered) tensors on rank 0's CPU; the frozen teacher is reloaded from its own path instead.
    return StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True, **extra)


def trainable_state(model: Distiller, world: World) -> dict[str, Tensor]:
    """Full float tensors of everything trained (student, projections), on rank 0; empty elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(world))
    seen: dict[int, str] = {}
    for name, tensor in list(state.items()):
        # Tied weights (Granite's head is its embedding) share storage, which safetensors refuses.
        if tensor.untyped_storage().data_ptr() in seen:
            state[name] = tensor.clone()
        seen[tensor.untyped_storage().data_ptr()] = name
    return state


def checkpoint_dir(run_dir: Path, step: int) -> Path:
    return run_dir / CHECKPOINTS / f"step-{step:08d}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    # Only renamed (hence complete) folders count; a ".step-*.tmp" left by a killed save is ignored.
    done = sorted(p for p in (run_dir / CHECKPOINTS).glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def resumed_reserve(run_dir: Path) -> int | None:
    """How many blocks the run being resumed holds out of training (:class:`Blocks`), as its latest
    checkpoint recorded it; None before the first checkpoint (nothing trained is kept: start afresh)."""
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is None:
        return None
    return read_state(checkpoint).get("heldout_reserve")


_DAMAGED_FIX = ("delete that step-* folder to resume from the checkpoint before it, or start afresh: drop --resume "
                "and pass output.overwrite=true")
_STATE_KEYS = {"step", "tokens", "scheduler"}


def read_state(checkpoint: Path) -> dict[str, Any]:
    """A checkpoint's ``state.json``, refused (one line) if it is not one minitron wrote."""
    from minitron.inputs import read_json

    try:
        state = read_json(checkpoint / "state.json")
    except UserError as e:
        raise UserError(f"damaged checkpoint: {e.what}", where=e.where, fix=_DAMAGED_FIX) from None
    if not isinstance(state, dict) or not _STATE_KEYS <= state.keys():
        raise UserError("damaged checkpoint: state.json lacks the step, tokens or scheduler it should record",
                        where=str(checkpoint / "state.json"), fix=_DAMAGED_FIX)  # fmt: skip
    return state


def check_checkpoint(checkpoint: Path) -> None:
    """Refuse, before any model is loaded, a checkpoint whose files cannot be read: its state, the headers
    of its safetensors files (which safetensors checks against the file's length) and the directory of the
    optimizer's zip archive. Written by rename only when complete, a checkpoint is damaged only by something
    outside minitron (a copy cut short, a disk error)."""
    import zipfile

    from safetensors import SafetensorError, safe_open

    read_state(checkpoint)
    for file in [checkpoint / "model.safetensors", *sorted(checkpoint.glob("rng-*.safetensors"))]:
        try:
            with safe_open(file, framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise UserError(f"damaged checkpoint: cannot read {file.name} ({str(e).splitlines()[0][:120]})",
                            where=str(file), fix=_DAMAGED_FIX) from None  # fmt: skip
    optimizer = checkpoint / "optimizer.pt"
    try:
        with zipfile.ZipFile(optimizer) as archive:
            archive.namelist()
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"damaged checkpoint: cannot read optimizer.pt ({e})", where=str(optimizer),
                        fix=_DAMAGED_FIX) from None  # fmt: skip


def save_checkpoint(run_dir, step, model, optimizer, scheduler, world, *, keep, tokens, heldout_reserve) -> Path:
    """Model, optimizer, scheduler, data position and every process's RNG, written to a temporary folder
    that is renamed into place only when complete."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    final = checkpoint_dir(run_dir, step)
    tmp = final.with_name(f".{final.name}.tmp")
    weights = trainable_state(model, world)
    optim = get_optimizer_state_dict(model, optimizer, options=_state_options(world))
    if world.main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier(world)
    try:
        save_file(_rng_state(world), tmp / f"rng-{world.rank}.safetensors")
        if world.main:
            save_file(weights, tmp / "model.safetensors")
            torch.save(optim, tmp / "optimizer.pt")
            state = {
                "step": step, "tokens": tokens, "world_size": world.size, "scheduler": scheduler.state_dict(),
                "heldout_reserve": heldout_reserve,
            }  # fmt: skip
            barrier(world)  # every process has written its RNG state
            (tmp / "state.json").write_text(json.dumps(state, indent=2))
            give_umask(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
    except BaseException:  # a full disk, Ctrl-C: no half-written checkpoint stays beside the complete ones
        if world.main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if world.main:
        for old in sorted(p for p in final.parent.glob("step-*") if p != final)[: -keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        barrier(world)
    barrier(world)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, world) -> dict[str, Any]:
    """Restore a checkpoint into the (already wrapped) model and optimizer; returns its ``state.json``."""
    import pickle

    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = read_state(path)
    broadcast = world.size > 1  # rank 0 reads the files and sends every other process its shard
    try:  # check_checkpoint read the headers; damage inside the data shows only now
        weights = load_file(path / "model.safetensors") if world.main or not broadcast else {}
        optim = torch.load(path / "optimizer.pt", weights_only=True) if world.main or not broadcast else {}
    except (SafetensorError, RuntimeError, pickle.UnpicklingError, OSError) as e:
        raise UserError(f"damaged checkpoint: {str(e).splitlines()[0][:160]}", where=str(path),
                        fix=_DAMAGED_FIX) from None  # fmt: skip
    expected = set(trainable_state(model, world)) if world.main else set()
    if world.main and set(weights) != expected:
        raise UserError(
            f"checkpoint does not fit this model ({len(set(weights) ^ expected)} tensors differ)",
            where=str(path),
            fix="resume with the recipe that wrote it",
        )
    options = _state_options(world, broadcast_from_rank0=broadcast, strict=False)
    set_model_state_dict(model, weights, options=options)
    set_optimizer_state_dict(model, optimizer, optim, options=options)
    scheduler.load_state_dict(state["scheduler"])
    return state


def _rng_state(world: World) -> dict[str, Tensor]:
    version, mt, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(keys.astype(np.int64)),
        "python_mt": torch.tensor(mt, dtype=torch.int64),
        # Scalars ride along as 0-d tensors; a float64 keeps the cached Gaussians exactly.
        "numpy_pos": torch.tensor(pos),
        "numpy_has_gauss": torch.tensor(has_gauss),
        "numpy_cached": torch.tensor(cached, dtype=torch.float64),
        "python_version": torch.tensor(version),
        "python_gauss": torch.tensor(float("nan") if gauss is None else gauss, dtype=torch.float64),
    }
    if world.device.type == "cuda":
        tensors["cuda"] = torch.cuda.get_rng_state(world.device)
    return tensors


def _restore_rng(path: Path, world: World) -> None:
    from safetensors.torch import load_file

    file = path / f"rng-{world.rank}.safetensors"
    if not file.is_file():  # resumed on more processes than saved: the new ones start from the seed
        return
    s = load_file(file)
    torch.set_rng_state(s["torch"])
    if "cuda" in s and world.device.type == "cuda":
        torch.cuda.set_rng_state(s["cuda"], world.device)
    keys = s["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, int(s["numpy_pos"]), int(s["numpy_has_gauss"]), float(s["numpy_cached"])))
    gauss = float(s["python_gauss"])
    random.setstate((int(s["python_version"]), tuple(s["python_mt"].tolist()), None if math.isnan(gauss) else gauss))


# --- the run folder -------------------------------------------------------------------------------------------


def check_run_dir(recipe: Recipe, resume: bool) -> dict[str, Any]:
    """Decide what happens to the run folder, writing nothing: refuse to clobber an earlier run unless asked,
    refuse ``--resume`` with no run to resume, and keep a resumed run on its original recipe.

    Returns the recipe keys that changed since the run being resumed (``{"optimizer.lr": [old, new]}``):
    only those that do not change what was computed so far, and the optimizer settings a user lowers to
    recover from a diverging run (:data:`_RESUMABLE_OPTIMIZER`).
    """
    from minitron.artifacts import check_writable, deleted_input

    run_dir = Path(recipe.output.dir)
    saved = run_dir / RECIPE
    if resume:
        if not run_dir.exists():
            raise UserError(
                "nothing to resume: the run folder does not exist",
                where=f"output.dir {run_dir}", fix="drop --resume to start the run, or point output.dir at it",
            )  # fmt: skip
        if not saved.is_file():
            raise UserError(
                f"nothing to resume: no {RECIPE} in the folder (not a minitron distill run)",
                where=f"output.dir {run_dir}", fix="drop --resume and choose another output.dir",
            )  # fmt: skip
        check_writable(run_dir / RECIPE)
        changes = _changes(load_recipe(saved), recipe, saved)
        checkpoint = latest_checkpoint(run_dir)
        if checkpoint is not None:
            check_checkpoint(checkpoint)
        return changes
    if run_dir.exists() and not recipe.output.overwrite:
        raise UserError(
            "run folder already exists",
            where=f"output.dir {run_dir}",
            fix="pass --resume to continue it, output.overwrite=true to replace it, or another output.dir",
        )
    inputs = [("teacher.path", recipe.teacher.path if recipe.teacher else None),
              ("student.path", recipe.student.path), ("data.source", recipe.data.source)]  # fmt: skip
    clash = deleted_input(run_dir, inputs) if run_dir.exists() else None  # output.overwrite deletes the folder
    if clash:
        raise UserError(f"output.overwrite would delete an input: the run folder {clash}", where=f"output.dir {run_dir}",
                        fix="choose another output.dir")  # fmt: skip
    check_writable(run_dir, size=_run_bytes(recipe))
    return {}


def _run_bytes(recipe: Recipe) -> int:
    """Roughly what a run writes: the final student, and the checkpoints kept (float32 weights and Adam's
    two moments: 12 bytes per parameter each)."""
    from minitron.families import Shape
    from minitron.inputs import read_config

    with contextlib.suppress(UserError, OSError, KeyError, TypeError, ValueError):
        params = Shape.from_config(read_config(recipe.student.path)).counts()["total"]
        kept = recipe.checkpoint.keep if recipe.checkpoint.every else 0
        return params * ((2 if recipe.precision == "bf16" else 4) + 12 * kept)
    return 0  # a hub student: its size is not known without downloading it


def prepare_run_dir(recipe: Recipe, resume: bool, world: World) -> Path:
    """Create (or, with ``output.overwrite``, replace) the run folder and save the recipe in it; called once
    everything that can be refused has been checked (:func:`check_run_dir` and the inputs)."""
    run_dir = Path(recipe.output.dir)
    existed = run_dir.exists()
    barrier(world)  # every process has looked before the main one creates or deletes: all decide alike
    if world.main:
        if existed and not resume:
            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        # A save killed half-way leaves a hidden temporary checkpoint folder: nothing else will remove it.
        for leftover in (run_dir / CHECKPOINTS).glob(".step-*.tmp"):
            shutil.rmtree(leftover, ignore_errors=True)
        with atomic_file(run_dir / RECIPE, overwrite=True) as tmp:
            tmp.write_text(recipe.to_yaml())
    barrier(world)
    return run_dir


def _changes(old: Recipe, new: Recipe, where: Path) -> dict[str, list[Any]]:
    """``{key: [old, new]}`` for what a resume changes; a :class:`UserError` for a change it may not make."""
    def flat(recipe: Recipe) -> dict[str, Any]:  # sections whole, the optimizer key by key
        sections = recipe.model_dump(by_alias=True)
        return {**{f"optimizer.{k}": v for k, v in sections.pop("optimizer").items()}, **sections}

    before, after = flat(old), flat(new)
    allowed = (*_RESUMABLE_CHANGES, *(f"optimizer.{k}" for k in _RESUMABLE_OPTIMIZER))
    changed = {key: [before[key], after[key]] for key in before if before[key] != after[key]}
    for key in changed:
        if key not in allowed:
            raise UserError(
                f"{key} differs from the run being resumed" if "." in key
                else f"the recipe's {key!r} section differs from the run being resumed",
                where=str(where),
                fix=f"resume with the same {key} (only {', '.join(allowed)} may change), or start a new run",
            )  # fmt: skip
    return changed


class Metrics:
    """``metrics.jsonl``: one JSON object per training step or evaluation, written by the main process."""

    def __init__(self, path: Path, world: World, resume_step: int | None):
        self.path, self.main = path, world.main
        if self.main and resume_step is not None and path.is_file():
            # Lines written after the checkpoint we resume from describe steps that will be redone.
            keep = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= resume_step]
            path.write_text("".join(line + "\n" for line in keep))
        elif self.main and resume_step is None:
            path.write_text("")

    def write(self, **record: Any) -> None:
        if self.main:
            with self.path.open("a") as f:
                f.write(json.dumps(finite_record(record), allow_nan=False) + "\n")


def finite_record(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with every NaN or infinity replaced by ``null`` and named in ``"nonfinite"``: ``NaN`` is not
    JSON, and jq, pandas and most JSON readers refuse a file holding it."""
    bad = [k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v)]
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, "nonfinite": bad}

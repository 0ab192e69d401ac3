"""``minitron distill``: retrain a pruned student from its teacher by logit distillation (2408.11796).

The whole run reads top to bottom in :func:`train`: setup → loop → save.

* **setup** checks the recipe's inputs (paths, one shared vocabulary, context, hidden-state pairs) and the
  run folder before anything expensive, tokenizes the data once (cached), loads both models, puts them side
  by side in a :class:`Distiller` and, with several processes, shards it with FSDP2 in :func:`parallelize`;
  only then is the run folder created, so a refused run leaves nothing that would block its corrected rerun.
* **loop**: each optimizer step runs the step's micro-batches, normalises every loss by the number of
  valid tokens in the *whole* global batch (so 1 × 4 accumulation == 4 × 1 and 2 processes == 1), checks
  loss and gradient norm are finite (and says whether the teacher or the student went non-finite), then steps; evaluation on held-out blocks and atomic checkpoints
  (model, optimizer, scheduler, RNG of every process, data position) happen every N steps.
* **save** writes a stock Hugging Face checkpoint (weights, config, tokenizer) whose model card gains the
  distillation lineage.

Processes come from the launcher (``torchrun`` or ``accelerate launch``: both set ``RANK``/``WORLD_SIZE``);
the backend is NCCL on GPUs and gloo on CPU.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from minitron.artifacts import atomic_dir, atomic_file, note, versions
from minitron.errors import UserError
from minitron.losses import HiddenStateLoss, combine_losses, forward_kl, layer_outputs, lm_loss, output_head
from minitron.recipe import Data, Optimizer, Recipe, check_inputs

FINAL = "final"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RECIPE = "recipe.yaml"
# Keys of a recipe that may change between a run and its resume: they do not change what is computed.
_RESUMABLE_CHANGES = ("eval", "checkpoint", "output")
# Optimizer keys that may change on resume: what a user lowers or raises to recover from divergence. They
# apply from the resumed step on (the schedule is recomputed with them) and are recorded in metrics.jsonl.
_RESUMABLE_OPTIMIZER = ("lr", "min_lr", "warmup_steps", "schedule", "weight_decay", "grad_clip")


# --- processes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group the launcher set up (``WORLD_SIZE`` > 1), or run alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank() if size > 1 else 0, size=size, device=device)


def all_sum(tensor: Tensor, world: World) -> Tensor:
    if world.size > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# --- data: tokenized once, cached, read by position -----------------------------------------------------------


# Documents per tokenizer call: one fast-tokenizer call amortised over many documents.
_TOKENIZE_BATCH = 1024


def cache_root(data: Data) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    return Path(os.environ.get("MINITRON_CACHE", "~/.cache/minitron")).expanduser() / "tokens"


def packed_blocks(data: Data, tokenizer: Any, world: World) -> np.ndarray:
    """The data as ``[blocks, seq_len]`` token ids (a read-only memory map of the cached token stream).

    Documents are tokenized once per (data source, tokenizer) and cached as a flat ``uint32`` stream, so
    a second run, a resume or another ``seq_len`` costs nothing; the last partial block is dropped.
    """
    folder = cache_root(data) / _data_key(data, tokenizer)
    cached = (folder / "meta.json").is_file()
    barrier(world)  # every process has looked before the main one writes: all take the same branch
    if not cached:
        if world.main:
            _tokenize_to(folder, data, tokenizer)
        barrier(world)
    meta = json.loads((folder / "meta.json").read_text())
    stream = np.memmap(folder / "tokens.u32", dtype=np.uint32, mode="r", shape=(meta["tokens"],))
    blocks = meta["tokens"] // data.seq_len
    return stream[: blocks * data.seq_len].reshape(blocks, data.seq_len)


def _data_key(data: Data, tokenizer: Any) -> str:
    source = Path(data.source)
    if source.exists():
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        # Size and modification time stand for the content (as make does): hashing a corpus of billions
        # of tokens on every start would cost more than the check saves.
        identity: Any = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    else:
        identity = {"hub": data.source, "split": data.split}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = json.dumps({"format": 1, "source": identity, "tokenizer": vocab, "separator": _separator(tokenizer)})
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _separator(tokenizer: Any) -> list[int]:
    # EOS between documents as in pre-training; BOS for a tokenizer without EOS.
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def _tokenize_to(folder: Path, data: Data, tokenizer: Any) -> None:
    from minitron.data import SUFFIXES, load_texts
    from minitron.report_console import progress

    source = Path(data.source)
    # A folder is read one file at a time, so that a corpus of many shards never sits in memory whole.
    files = sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES and p.stat().st_size) if source.is_dir() else []
    parts = [lambda f=f: load_texts(f) for f in files] or [lambda: load_texts(data.source, split=data.split)]
    separator = _separator(tokenizer)
    tokens = documents = seen = 0
    with atomic_dir(folder, overwrite=True) as tmp, progress() as bar:
        task = bar.add_task("tokenizing", total=None)
        with (tmp / "tokens.u32").open("wb") as out:
            for read in parts:
                texts = read()
                seen += len(texts)
                bar.update(task, total=seen)
                for start in range(0, len(texts), _TOKENIZE_BATCH):
                    chunk = texts[start : start + _TOKENIZE_BATCH]
                    ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    stream = np.fromiter((i for doc in ids for i in [*doc, *separator]), dtype=np.uint32)
                    stream.tofile(out)
                    tokens, documents = tokens + len(stream), documents + len(chunk)
                    bar.advance(task, len(chunk))
        meta = {"tokens": tokens, "documents": documents, "source": data.source, "split": data.split}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


class Blocks:
    """Which blocks every process reads at every step: a pure function of (seed, step), so a resumed run
    reads exactly what the uninterrupted one would have.

    A seeded region of ``reserve`` blocks is kept out of training; evaluation reads its first ``heldout``
    (``eval.blocks``). Training walks the rest in a fresh seeded order each epoch; step ``s`` takes global
    positions ``[s·G, (s+1)·G)`` of that endless stream, process ``r`` the ``r``-th contiguous share of
    them, cut into micro-batches. The region is the run's own (``eval.blocks`` when it started, recorded in
    its checkpoints, :func:`resumed_reserve`): were it cut at ``eval.blocks``, a resume that changes
    ``eval.blocks`` would train on other blocks and evaluate on blocks already trained on.
    """

    def __init__(self, blocks: np.ndarray, *, heldout: int, seed: int, reserve: int | None = None):
        reserve = heldout if reserve is None else reserve
        if heldout > reserve:
            raise UserError(
                f"{heldout} is more than the {reserve} blocks this run has held out of training since it began",
                where="eval.blocks",
                fix=f"resume with eval.blocks ≤ {reserve} (more would evaluate on blocks already trained on), "
                "or start a new run",
            )
        if len(blocks) <= reserve:
            raise UserError(
                f"the data packs into {len(blocks)} blocks, not more than the {reserve} held out for evaluation",
                where="data.source",
                fix="use more text, a shorter data.seq_len or fewer eval.blocks",
            )
        self.blocks, self.seed, self.reserve = blocks, seed, reserve
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).numpy()
        self.heldout, self.train = np.sort(order[:heldout]), order[reserve:]
        self._epochs: dict[int, np.ndarray] = {}

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epochs = {epoch: self.train[torch.randperm(len(self.train), generator=generator).numpy()]}
        return self._epochs[epoch]

    def _read(self, ids: np.ndarray) -> Tensor:
        return torch.from_numpy(self.blocks[np.sort(ids)].astype(np.int64))

    def step(self, step: int, global_batch: int, micro: int, world: World) -> list[Tensor]:
        share = global_batch // world.size
        start = step * global_batch + world.rank * share
        positions = np.arange(start, start + share)
        ids = np.array([self._epoch(int(p) // len(self.train))[int(p) % len(self.train)] for p in positions])
        return [self._read(ids[i : i + micro]) for i in range(0, share, micro)]

    def evaluation(self, micro: int, world: World) -> list[Tensor]:
        # Every process must run the same number of forwards (FSDP gathers weights in each): the held-out
        # blocks that do not divide evenly among processes are left out.
        share = len(self.heldout) // world.size
        if share == 0:
            raise UserError(
                f"{len(self.heldout)} held-out blocks cannot be shared among {world.size} processes",
                where="eval.blocks",
                fix=f"set eval.blocks to at least {world.size}",
            )
        ids = self.heldout[world.rank * share : (world.rank + 1) * share]
        return [self._read(ids[i : i + micro]) for i in range(0, share, micro)]


# --- the model pair -------------------------------------------------------------------------------------------


class Distiller(nn.Module):
    """The student and its frozen teacher in one module, with the losses between them.

    One module so that FSDP2 gathers both output heads (and the hidden-state projections) inside one
    forward: the fused losses read the head weights directly instead of materialising full logits.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None, recipe: Recipe):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.loss = recipe.loss
        pairs = recipe.loss.hidden.pairs if recipe.loss.hidden else []
        self.pairs = [tuple(p) for p in pairs]
        if teacher is not None:
            teacher.requires_grad_(False).eval()
        widths = (student.config.hidden_size, teacher.config.hidden_size if teacher is not None else 0)
        kind = recipe.loss.hidden.kind if recipe.loss.hidden else "cosine"
        self.hidden_losses = nn.ModuleList(HiddenStateLoss(*widths, kind=kind) for _ in self.pairs)

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # the teacher never trains: no dropout, no training-mode behaviour
        return self

    def forward(self, input_ids: Tensor, *, normalizer: float, with_lm: bool) -> dict[str, Tensor]:
        """Losses on ``[batch, seq]`` token ids, each a sum over this batch's tokens / ``normalizer``.

        ``normalizer`` is the number of predicted tokens in the whole global batch (a float: FSDP would
        cast a floating-point tensor input to bf16), so contributions add up to global means.
        """
        inputs, labels = input_ids[:, :-1], input_ids[:, 1:]
        want_states = bool(self.pairs) and self.training
        student, student_states = layer_outputs(
            self.student.base_model, want_states, input_ids=inputs, use_cache=False
        )
        student_head, student_divisor = output_head(self.student)
        chunk = self.loss.chunk_size
        lm = None
        if with_lm or self.teacher is None:
            lm = lm_loss(
                student.last_hidden_state, student_head, labels,
                divisor=student_divisor, chunk_size=chunk, normalizer=normalizer,
            )  # fmt: skip
        if self.teacher is None:  # LM-only training (teacher correction)
            total = self.loss.lm * lm
            flags = torch.stack([_nonfinite(student.last_hidden_state), torch.zeros((), device=total.device)])
            return {"total": total, "lm": lm.detach(), "kd": torch.zeros_like(total), "nonfinite": flags}

        with torch.no_grad():
            teacher, teacher_states = layer_outputs(
                self.teacher.base_model, want_states, input_ids=inputs, use_cache=False
            )
        # Which side went non-finite, should the loss: a bad teacher is not fixed by a lower learning rate. A
        # reduction over the final states costs little beside the forward and needs no host synchronisation.
        flags = torch.stack([_nonfinite(student.last_hidden_state), _nonfinite(teacher.last_hidden_state)])
        teacher_head, teacher_divisor = output_head(self.teacher)
        kd = forward_kl(
            student.last_hidden_state, student_head, teacher.last_hidden_state, teacher_head,
            temperature=self.loss.temperature, student_divisor=student_divisor, teacher_divisor=teacher_divisor,
            chunk_size=chunk, normalizer=normalizer,
        )  # fmt: skip
        hidden = [
            loss(student_states[s], teacher_states[t], normalizer=normalizer)
            for loss, (s, t) in zip(self.hidden_losses, self.pairs)
        ] if want_states else []  # fmt: skip
        out = combine_losses(kd, lm=lm, hidden=hidden, kd_weight=self.loss.kd, lm_weight=self.loss.lm)
        return {**out, "nonfinite": flags}


def _nonfinite(states: Tensor) -> Tensor:
    return (~torch.isfinite(states)).any().float()


def parallelize(distiller: Distiller, world: World, precision: str) -> Distiller:
    """The one place that shards for many processes: FSDP2 on every decoder layer of both models, then on
    the whole pair (embeddings, final norms, heads and projections), applied from outside the models.

    With bf16 the gathered weights are cast to bf16 for compute and gradients reduced in float32; the
    sharded master weights and the optimizer state stay float32.
    """
    if world.size == 1:
        return distiller
    return shard(distiller, precision)


def shard(distiller: Distiller, precision: str) -> Distiller:
    """FSDP2 as :func:`parallelize` applies it; needs an initialised process group (one process is enough:
    the GPU suite checks a one-process sharded step against the plain one)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if precision == "bf16" else None, reduce_dtype=torch.float32
    )
    for model in (distiller.student, distiller.teacher):
        if model is not None:
            for layer in model.base_model.layers:
                fully_shard(layer, mp_policy=policy)
    fully_shard(distiller, mp_policy=policy)
    return distiller


def compute_context(precision: str, world: World):
    """bf16 autocast when alone; under FSDP2 the mixed-precision policy casts instead."""
    if precision == "bf16" and world.size == 1:
        return torch.autocast(world.device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_models(recipe: Recipe, world: World, trust_remote_code: bool) -> Distiller:
    from minitron.inputs import load_model

    def load(path: str, dtype: torch.dtype) -> nn.Module:
        return load_model(path, dtype=dtype, trust_remote_code=trust_remote_code)

    # Master weights of the student in float32; the frozen teacher is only ever read, so bf16 suffices.
    student = load(recipe.student.path, torch.float32)
    if recipe.student.activation_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    teacher = None
    if recipe.teacher is not None:
        teacher = load(recipe.teacher.path, torch.bfloat16 if recipe.precision == "bf16" else torch.float32)
    distiller = Distiller(student, teacher, recipe).to(world.device)
    return parallelize(distiller, world, recipe.precision)


def _check_pairs(recipe: Recipe, student_config: Any, teacher_config: Any | None) -> None:
    """Hidden-state pairs name existing layers: checked on the configs, before any weight is loaded."""
    for s, t in recipe.loss.hidden.pairs if recipe.loss.hidden else []:
        for who, layer, config in (("student", s, student_config), ("teacher", t, teacher_config)):
            if layer > config.num_hidden_layers:
                raise UserError(
                    f"{who} layer {layer} does not exist ({config.num_hidden_layers} layers)",
                    where="loss.hidden.pairs",
                    fix=f"use 0 (embeddings) … {config.num_hidden_layers} (last layer)",
                )


# --- optimizer and schedule ------------------------------------------------------------------------------------


def make_optimizer(model: nn.Module, cfg: Optimizer, total_steps: int):
    params = [p for p in model.parameters() if p.requires_grad]
    # No weight decay on norms and biases (1-D), as in Megatron and most LLM recipes.
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_at(step, cfg, total_steps) / cfg.lr)
    return optimizer, scheduler


def apply_optimizer_settings(optimizer, scheduler, cfg: Optimizer, step: int, total_steps: int) -> None:
    """Put the recipe's optimizer settings into an optimizer and schedule restored from a checkpoint (which
    hold the settings they were saved with): a resume may lower the learning rate to recover from divergence.
    From ``step`` on, the schedule is the one the new settings give; Adam's moments carry on unchanged."""
    scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)
    scheduler.lr_lambdas = [lambda s: lr_at(s, cfg, total_steps) / cfg.lr] * len(optimizer.param_groups)
    for group, decays in zip(optimizer.param_groups, (True, False)):
        group["initial_lr"] = cfg.lr
        group["lr"] = lr_at(step, cfg, total_steps)
        group["weight_decay"] = cfg.weight_decay if decays else 0.0
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def lr_at(step: int, cfg: Optimizer, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warm-up to ``lr``, then cosine to ``min_lr``."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps))
    return cfg.min_lr + (cfg.lr - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


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
    return json.loads((checkpoint / "state.json").read_text()).get("heldout_reserve")


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
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(p for p in final.parent.glob("step-*") if p != final)[: -keep + 1 or None]:
            shutil.rmtree(old, ignore_errors=True)
    else:
        barrier(world)
    barrier(world)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler, world) -> dict[str, Any]:
    """Restore a checkpoint into the (already wrapped) model and optimizer; returns its ``state.json``."""
    from safetensors.torch import load_file
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    state = json.loads((path / "state.json").read_text())
    broadcast = world.size > 1  # rank 0 reads the files and sends every other process its shard
    weights = load_file(path / "model.safetensors") if world.main or not broadcast else {}
    optim = torch.load(path / "optimizer.pt", weights_only=True) if world.main or not broadcast else {}
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
    from minitron.artifacts import check_writable

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
        return _changes(Recipe.model_validate(_yaml(saved)), recipe, saved)
    if run_dir.exists() and not recipe.output.overwrite:
        raise UserError(
            "run folder already exists",
            where=f"output.dir {run_dir}",
            fix="pass --resume to continue it, output.overwrite=true to replace it, or another output.dir",
        )
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


def _yaml(path: Path) -> Any:
    import yaml

    return yaml.safe_load(path.read_text())


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


# --- one step, one evaluation ---------------------------------------------------------------------------------


def train_step(model: Distiller, optimizer, batches: list[Tensor], recipe: Recipe, world: World) -> dict[str, float]:
    """Forward and backward over the step's micro-batches, then the finite checks; no optimizer step yet."""
    predicted = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    normalizer = all_sum(torch.tensor(float(predicted), device=world.device), world).item()
    sums = torch.zeros(6, device=world.device)
    for i, batch in enumerate(batches):
        if world.size > 1:  # reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(batches) - 1)
        with compute_context(recipe.precision, world):
            out = model(batch.to(world.device), normalizer=normalizer, with_lm=recipe.loss.lm > 0)
        # FSDP averages gradients over processes; × size turns that back into the plain sum that the
        # global normaliser expects.
        (out["total"] * world.size).backward()
        zero = torch.zeros((), device=world.device)
        sums += torch.cat([
            torch.stack([out["total"].detach(), out["kd"], out.get("lm", zero), out.get("hidden", zero)]),
            out["nonfinite"],
        ])  # fmt: skip
    all_sum(sums, world)
    params = [p for p in model.parameters() if p.requires_grad]
    clip = recipe.optimizer.grad_clip or float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip, error_if_nonfinite=False)
    if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2
        grad_norm = grad_norm.full_tensor()
    loss, kd, lm, hidden, student_bad, teacher_bad = sums.tolist()
    return {
        "loss": loss, "kl": kd, "lm": lm, "hidden": hidden, "grad_norm": float(grad_norm),
        "nonfinite_student": student_bad > 0, "nonfinite_teacher": teacher_bad > 0,
    }  # fmt: skip


@torch.no_grad()
def evaluate(model: Distiller, batches: list[Tensor], recipe: Recipe, world: World) -> dict[str, float]:
    """LM loss (and KL to the teacher) per token on the held-out blocks."""
    model.eval()
    predicted = sum(b.shape[0] * (b.shape[1] - 1) for b in batches)
    normalizer = all_sum(torch.tensor(float(predicted), device=world.device), world).item()
    sums = torch.zeros(2, device=world.device)
    for batch in batches:
        with compute_context(recipe.precision, world):
            out = model(batch.to(world.device), normalizer=normalizer, with_lm=True)
        sums += torch.stack([out["lm"], out["kd"]])
    all_sum(sums, world)
    model.train()
    lm, kd = sums.tolist()
    return {"eval_lm": lm} if recipe.teacher is None else {"eval_lm": lm, "eval_kl": kd}


# --- the run --------------------------------------------------------------------------------------------------


def train(recipe: Recipe, *, resume: bool = False, trust_remote_code: bool = False, command: str | None = None) -> Path:
    """Run a recipe to the end (or from its last checkpoint with ``resume``); returns the final model folder."""
    world = init_world()
    try:
        return _train(recipe, world, resume=resume, trust_remote_code=trust_remote_code, command=command)
    finally:
        if world.size > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _train(recipe: Recipe, world: World, *, resume: bool, trust_remote_code: bool, command: str | None) -> Path:
    from minitron.report_console import progress

    # setup: everything that can be refused is refused before the run folder is created or touched, so that
    # a corrected rerun is never blocked by the debris of a refused one; the cheap checks come first.
    student_config, teacher_config, tokenizer = check_inputs(recipe, trust_remote_code=trust_remote_code)
    _check_context(recipe, student_config, teacher_config)
    _check_pairs(recipe, student_config, teacher_config)
    accumulation = recipe.batch.accumulation_for(world.size)
    total_steps = recipe.steps()
    changes = check_run_dir(recipe, resume)
    run_dir = Path(recipe.output.dir)
    if resume and (run_dir / FINAL / "config.json").is_file():
        return run_dir / FINAL  # finished before (check_run_dir allowed any difference in the recipe)
    _seed_everything(recipe.seed)

    data = Blocks(
        packed_blocks(recipe.data, tokenizer, world), heldout=recipe.eval.blocks, seed=recipe.seed,
        reserve=resumed_reserve(run_dir) if resume else None,
    )  # fmt: skip
    heldout = data.evaluation(recipe.batch.micro, world)
    model = load_models(recipe, world, trust_remote_code)
    optimizer, scheduler = make_optimizer(model, recipe.optimizer, total_steps)
    run_dir = prepare_run_dir(recipe, resume, world)

    step, tokens = 0, 0
    checkpoint = latest_checkpoint(run_dir) if resume else None
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, model, optimizer, scheduler, world)
        step, tokens = state["step"], state["tokens"]
        _restore_rng(checkpoint, world)
        apply_optimizer_settings(optimizer, scheduler, recipe.optimizer, step, total_steps)
    elif resume and world.main:
        note(f"{run_dir} has no checkpoint yet: the run starts again from step 0")
    metrics = Metrics(run_dir / METRICS, world, resume_step=step if checkpoint is not None else None)
    if changes:
        metrics.write(step=step, tokens=tokens, resumed_with_changes=changes)
    if step == 0:
        metrics.write(step=0, tokens=0, **evaluate(model, heldout, recipe, world))
    last_eval: dict[str, float] = {}
    tokens_per_step = recipe.batch.global_ * recipe.data.seq_len

    # loop
    model.train()
    columns = _progress_columns()
    with progress(*columns) as bar:
        task = bar.add_task("distill", total=total_steps, completed=step, visible=world.main, **_fields())
        while step < total_steps:
            started = time.perf_counter()
            batches = data.step(step, recipe.batch.global_, recipe.batch.micro, world)
            assert len(batches) == accumulation  # the batch arithmetic was checked at setup
            stats = train_step(model, optimizer, batches, recipe, world)
            lr = optimizer.param_groups[0]["lr"]
            if not (math.isfinite(stats["loss"]) and math.isfinite(stats["grad_norm"])) or stats["nonfinite_teacher"]:
                metrics.write(step=step + 1, tokens=tokens, lr=lr, **stats)
                raise _non_finite(stats, step + 1, recipe, run_dir)
            del stats["nonfinite_student"], stats["nonfinite_teacher"]
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step, tokens = step + 1, tokens + tokens_per_step
            speed = tokens_per_step / (time.perf_counter() - started)
            metrics.write(step=step, tokens=tokens, lr=lr, tokens_per_s=speed, **stats)
            bar.update(task, completed=step, **_fields(stats["loss"], stats["kl"], speed, lr))

            if step == total_steps or (recipe.eval.every and step % recipe.eval.every == 0):
                last_eval = evaluate(model, heldout, recipe, world)
                metrics.write(step=step, tokens=tokens, **last_eval)
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < total_steps:
                save_checkpoint(
                    run_dir, step, model, optimizer, scheduler, world, keep=recipe.checkpoint.keep, tokens=tokens,
                    heldout_reserve=data.reserve,
                )

    # save
    if not last_eval:  # resumed a run that had already finished
        last_eval = evaluate(model, heldout, recipe, world)
    final = save_final(run_dir, model, student_config, tokenizer, recipe, world, tokens=tokens, steps=step,
                       metrics=last_eval, command=command)  # fmt: skip
    return final


def _check_context(recipe: Recipe, student_config: Any, teacher_config: Any | None) -> None:
    """``data.seq_len`` must fit both models' context: beyond it, positions the models never saw are trained on."""
    for who, config in (("student", student_config), ("teacher", teacher_config)):
        context = getattr(config, "max_position_embeddings", None) if config is not None else None
        if isinstance(context, int) and recipe.data.seq_len > context:
            raise UserError(
                f"data.seq_len {recipe.data.seq_len} is longer than the {who}'s context ({context} tokens)",
                where="data.seq_len", fix=f"set data.seq_len to at most {context}",
            )  # fmt: skip


def _non_finite(stats: dict[str, Any], step: int, recipe: Recipe, run_dir: Path) -> UserError:
    """The error for a step whose loss or gradient is not finite, saying whose fault it is and what to do."""
    done = latest_checkpoint(run_dir)
    kept = f"checkpoint {done.name} is intact" if done else "there is no checkpoint yet (the resume starts at step 0)"
    if stats["nonfinite_teacher"]:
        return UserError(
            f"the teacher's output is not finite (NaN or inf) at step {step}: its weights or this data are bad, "
            "which no learning rate fixes",
            where=f"teacher.path {recipe.teacher.path if recipe.teacher else None}",
            fix="check the teacher alone (`minitron eval` on it; a float16 checkpoint can overflow: use its "
            f"bfloat16 or float32 weights) and the data; nothing was stepped and {kept}",
        )  # fmt: skip
    cause = "its output is not finite" if stats["nonfinite_student"] else (
        f"loss {stats['loss']}, gradient norm {stats['grad_norm']}")  # fmt: skip
    lower = [f"optimizer.lr={recipe.optimizer.lr / 2:.3g}"]
    if recipe.optimizer.min_lr > recipe.optimizer.lr / 2:
        lower.append(f"optimizer.min_lr={recipe.optimizer.lr / 20:.3g}")
    teacher = ", the teacher's output is finite" if recipe.teacher is not None else ""
    return UserError(
        f"the student diverged at step {step} ({cause}{teacher})",
        where=str(run_dir),
        fix=f"nothing was stepped and {kept}: resume with a lower learning rate, "
        f"`minitron distill {run_dir / RECIPE} --resume {' '.join(lower)}` (a longer optimizer.warmup_steps "
        "or a smaller optimizer.grad_clip also help)",
    )  # fmt: skip


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _progress_columns():
    from rich.progress import TextColumn

    return (TextColumn("loss {task.fields[loss]}  KL {task.fields[kl]}  {task.fields[speed]} tok/s  lr {task.fields[lr]}"),)


def _fields(loss: float = math.nan, kl: float = math.nan, speed: float = 0.0, lr: float = 0.0) -> dict[str, str]:
    return {"loss": f"{loss:.4f}", "kl": f"{kl:.4f}", "speed": f"{speed:,.0f}", "lr": f"{lr:.2e}"}


_CARD_INTRO = (
    "A student trained by logit distillation from its teacher with minitron (arXiv 2408.11796); "
    "the section below records how."
)


def save_final(run_dir, model, student_config, tokenizer, recipe, world, *, tokens, steps, metrics, command) -> Path:
    """The trained student as a stock Hugging Face checkpoint in ``<run>/final``, card and all."""
    from transformers import AutoModelForCausalLM

    from minitron.model_card import add_distillation_section

    prefix = "student."
    state = {k.removeprefix(prefix): v for k, v in trainable_state(model, world).items() if k.startswith(prefix)}
    final = run_dir / FINAL
    if world.main:
        dtype = torch.bfloat16 if recipe.precision == "bf16" else torch.float32
        with torch.device("meta"):
            clean = AutoModelForCausalLM.from_config(student_config, dtype=dtype)
        # A fresh module (not the FSDP-wrapped one) gives save_pretrained the model it expects.
        clean.load_state_dict({k: v.to(dtype) for k, v in state.items()}, assign=True, strict=True)
        clean.tie_weights()
        with atomic_dir(final, overwrite=True) as tmp:
            clean.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            source_card = Path(recipe.student.path) / "README.md"
            if source_card.is_file():  # the pruning lineage comes first, distillation is added to it
                shutil.copyfile(source_card, tmp / "README.md")
            else:
                front = "---\nlibrary_name: transformers\ntags: [minitron, distilled]\n---\n"
                (tmp / "README.md").write_text(f"{front}# {run_dir.name}\n\n{_CARD_INTRO}\n")
            (tmp / "distill_recipe.yaml").write_text(recipe.to_yaml())
            add_distillation_section(
                tmp / "README.md",
                {
                    "teacher": recipe.teacher.path if recipe.teacher else "none (LM loss only)",
                    "student (before)": recipe.student.path,
                    "recipe": "`distill_recipe.yaml` beside this card",
                    "command": f"`{command}`" if command else "(called from Python)",
                    "loss": f"kd {recipe.loss.kd} (τ = {recipe.loss.temperature}), lm {recipe.loss.lm}"
                    + (", hidden-state losses" if recipe.loss.hidden else ""),
                    "data": recipe.data.source,
                    "steps": steps,
                    "tokens": f"{tokens:,}",
                    "global batch × seq_len": f"{recipe.batch.global_} × {recipe.data.seq_len}",
                    "processes": world.size,
                    **{f"final {k.replace('_', ' ')}": round(v, 5) for k, v in metrics.items()},
                    "versions": versions(),
                },
            )
    barrier(world)
    return final

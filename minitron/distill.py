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

The processes and the token cache live in :mod:`minitron.distill_data`, the run folder and checkpoints in
:mod:`minitron.distill_state`; this module holds the model pair, the step and the loop.
"""

from __future__ import annotations

import contextlib
import math
import random
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from minitron.artifacts import atomic_dir, note, versions
from minitron.distill_data import Blocks, World, all_sum, barrier, init_world, packed_blocks
from minitron.distill_state import (
    FINAL, METRICS, RECIPE, Metrics, _restore_rng, check_run_dir, latest_checkpoint, load_checkpoint, prepare_run_dir,
    resumed_reserve, save_checkpoint, trainable_state,
)  # fmt: skip
from minitron.errors import UserError
from minitron.inputs import check_seq_len
from minitron.losses import HiddenStateLoss, combine_losses, forward_kl, layer_outputs, lm_loss, output_head
from minitron.recipe import Optimizer, Recipe, check_inputs


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
    data.check_batch(recipe.batch.global_)
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
        if config is not None:
            check_seq_len(config, recipe.data.seq_len, "data.seq_len", whose=who)


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

"""Architecture search: from a parameter budget (``--target 4B``) to a pruned student, ``minitron prune --target``.

The search reads in data-flow order across four modules, each usable on its own:

1. ``search_grid`` — shape arithmetic only, no weights: :func:`~minitron.search_grid.enumerate_candidates` lists
   every shape on a hardware-friendly grid within ``--tolerance`` of the target (all ``--dry-run`` needs).
2. ``search_scoring`` — :class:`~minitron.search_scoring.HeldOut` scores a model by LM loss (or KL to the teacher)
   on held-out tokens; :func:`~minitron.search_scoring.short_distill` retrains a candidate briefly first.
3. ``search_depth`` — :class:`~minitron.search_depth.DepthChooser`: which ``n`` layers to remove.
4. this module — :func:`rank_candidates` prunes the teacher in memory to each of the first
   ``--top-k-candidates`` shapes and scores it, optionally after ``--search-steps`` short distillation steps
   (the lightweight architecture search of Minitron, arXiv 2407.14679 §3), and :func:`run` writes the best one
   with its ``search.json``.
"""

from __future__ import annotations

import contextlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minitron.errors import UserError
from minitron.families import Shape
from minitron.search_depth import DEPTH_STRATEGIES, DepthChooser
from minitron.search_grid import Candidate, Request, dry_run_record
from minitron.search_scoring import RANK_BY, HeldOut, short_distill

# --- ranking the candidates ----------------------------------------------------------------------------------


@dataclass
class Ranked:
    """A candidate after evaluation: which layers it drops and its held-out score (lower is better)."""

    candidate: Candidate
    drop_layers: list[int]
    score: float
    plan: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "drop_layers": self.drop_layers, "score": self.score}


def rank_candidates(
    teacher: Any,
    candidates: Sequence[Candidate],
    scores: Any,
    heldout: HeldOut,
    *,
    rank_by: str = "loss",
    depth: DepthChooser | None = None,
    drop_layers: list[int] | None = None,
    search_steps: int = 0,
    train_blocks: Any = None,
    lr: float = 1e-4,
    batch_size: int = 1,
    seed: int = 0,
    progress: Any = None,
) -> list[Ranked]:
    """Prune ``teacher`` in memory to each candidate, optionally distil it briefly, and score it on ``heldout``.

    Returns the candidates best (lowest score) first; ties keep the enumeration order. The teacher is never
    modified: each candidate is a new model holding sliced copies. Deterministic for a fixed ``seed``.
    """
    from minitron.plan import make_plan
    from minitron.prune import prune_model

    if rank_by not in RANK_BY:
        raise UserError(f"unknown ranking {rank_by!r}", where="--rank-by", fix=f"choose {', '.join(RANK_BY)}")
    if search_steps and train_blocks is None:
        raise UserError("--search-steps needs training tokens", where="--search-steps", fix="pass --calib DATA")
    shape = Shape.from_config(teacher.config)
    device = next(teacher.parameters()).device
    ranked = []
    task = progress.add_task("ranking candidates", total=len(candidates)) if progress else None
    for candidate in candidates:
        drop = list(drop_layers) if drop_layers is not None else (
            depth(shape.layers - candidate.shape.layers) if depth is not None else None
        )
        plan = make_plan(shape, candidate.shape, scores, drop)
        # prune_model builds a new model from sliced copies (on the CPU); the teacher itself is left as it was.
        student = prune_model(teacher, plan).to(device)
        if search_steps:
            short_distill(student, teacher, train_blocks, steps=search_steps, lr=lr, batch_size=batch_size, seed=seed)
        torch.manual_seed(seed)
        ranked.append(Ranked(candidate, plan.dropped_layers, heldout.score(student, rank_by), plan))
        del student
        if progress:
            progress.advance(task)
    order = sorted(range(len(ranked)), key=lambda i: (ranked[i].score, i))
    return [ranked[i] for i in order]


# --- the `minitron prune --target` run -----------------------------------------------------------------------

SEARCH_FILE = "search.json"
SEARCH_VERSION = 1
DEFAULT_TOP_K = 5
DEFAULT_HELDOUT = 32
SEARCH_LR = 1e-4  # the peak LR of Minitron's distillation (2408.11796), held constant for the short runs


@dataclass(frozen=True)
class Ranking:
    """How the candidates are compared (the ranking flags of ``minitron prune``)."""

    top_k: int = DEFAULT_TOP_K
    rank_by: str = "loss"
    depth_strategy: str = "window"
    search_steps: int = 0
    heldout_samples: int = DEFAULT_HELDOUT

    def check(self) -> None:
        if self.rank_by not in RANK_BY:
            raise UserError(f"unknown ranking {self.rank_by!r}", where="--rank-by", fix=f"choose {', '.join(RANK_BY)}")
        if self.depth_strategy not in DEPTH_STRATEGIES:
            raise UserError(f"unknown depth strategy {self.depth_strategy!r}", where="--depth-strategy",
                            fix=f"choose {', '.join(DEPTH_STRATEGIES)}")
        for flag, value, least in (("--top-k-candidates", self.top_k, 1), ("--search-steps", self.search_steps, 0),
                                   ("--heldout-samples", self.heldout_samples, 1)):
            if value < least:
                raise UserError(f"must be at least {least}, got {value}", where=flag)


def _device() -> torch.device:
    from minitron.importance import resolve_device

    return resolve_device("auto")


def _calibration_blocks(src: Any, calibration: Any, scores: Any, heldout: int, trust_remote_code: bool, vocab: int):
    """(importance blocks, held-out blocks) from one seeded stream of ``--calib`` data.

    The held-out blocks are the ones that *follow* the importance blocks in the same stream (token_blocks
    packs documents in a seeded order, so asking for more blocks only appends), so they never repeat a block
    the scores were computed on. With ``--scores``, the stream is laid out as the scores' own settings say;
    it is disjoint from their blocks when ``--calib`` and ``--seed`` are those the scores were computed with.
    """
    from minitron.data import token_blocks
    from minitron.inputs import load_tokenizer

    settings = (scores.meta.get("settings", {}) if scores is not None else {}) or {}
    samples = int(settings.get("samples", calibration.samples))
    seq_len = int(settings.get("seq_len", calibration.seq_len))
    tokenizer = load_tokenizer(
        src, trust_remote_code=trust_remote_code, fix="--calib needs the teacher's tokenizer files beside its weights",
        vocab=vocab,
    )
    blocks = token_blocks(
        tokenizer, calibration.data, seq_len=seq_len, samples=samples + heldout, seed=calibration.seed,
        flags="--samples, --heldout-samples or --seq-len",
    )  # fmt: skip
    return blocks[:samples], blocks[samples:]


def _needs_data(shortlist: Sequence[Candidate], teacher: Shape, ranking: Ranking, scores: Any) -> bool:
    if len(shortlist) > 1 or ranking.search_steps or scores is None:
        return True
    drops = shortlist[0].shape.layers < teacher.layers
    return drops and (
        ranking.depth_strategy == "window" or (ranking.depth_strategy == "loss" and "layer_loss" not in scores.tensors)
    )


def run(
    model: str,
    teacher: Shape,
    request: Request,
    ranking: Ranking,
    *,
    out: str | Path | None,
    drop_layers: list[int] | None = None,
    scores_file: str | Path | None = None,
    calibration: Any = None,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Search the student shape for ``request``'s budget, prune to the best, write it with ``search.json``.

    Cheap checks first (flags, candidates, output folder, checkpoint headers, scores file, calibration
    tokens), then the model is loaded once: importance scores (unless ``scores_file``), held-out scoring of
    the first ``ranking.top_k`` candidates, and the streamed prune of the winner into ``out``.
    """
    from minitron import prune as pruning
    from minitron.artifacts import atomic_dir, check_output_dir
    from minitron.importance import compute_scores, resolve_dtype
    from minitron.inputs import check_weights, load_config, load_model
    from minitron.plan import make_plan, summary
    from minitron.report_console import progress

    ranking.check()
    found = request.candidates()
    shortlist = found[: ranking.top_k]
    if out is None:
        raise UserError("no output folder", where="-o", fix="pass -o OUT, or --dry-run to list the candidates")
    inputs = pruning.run_inputs(model, scores_file, calibration)
    check_output_dir(out, overwrite, inputs=inputs)
    src = pruning.local_checkpoint(model)
    stored = check_weights(src, teacher)  # a broken checkpoint is refused before any calibration, not after
    # Whichever candidate wins, its checkpoint must fit: the largest one shortlisted sets the space needed.
    size = max(pruning.student_bytes(stored, c.shape, src) for c in shortlist)
    check_output_dir(out, overwrite, size=size, inputs=inputs)
    scores = pruning.load_scores(scores_file, teacher, model) if scores_file is not None else None
    if _needs_data(shortlist, teacher, ranking, scores) and calibration is None:
        raise UserError(
            f"ranking {len(shortlist)} candidate(s) needs held-out calibration tokens",
            where="--calib",
            fix="pass --calib DATA; or --scores FILE with --top-k-candidates 1 to take the first candidate unranked",
        )
    pruning.note_unscaled(scores, teacher, any(c.shape.hidden < teacher.hidden for c in shortlist), scores_file)

    device = _device()
    record_heldout = None
    if calibration is None:
        # One candidate, scores given, no measurement needed: plan straight from the scores, no weights loaded.
        depth = DepthChooser(ranking.depth_strategy, None, scores, None, ranking.rank_by)
        candidate = shortlist[0]
        drop = drop_layers or depth(teacher.layers - candidate.shape.layers)
        plan = make_plan(teacher, candidate.shape, scores, drop)
        ranked = [Ranked(candidate, plan.dropped_layers, float("nan"), plan)]
        computed = None
    else:
        importance_blocks, heldout_blocks = _calibration_blocks(
            src, calibration, scores, ranking.heldout_samples, trust_remote_code, teacher.vocab
        )
        # As `minitron importance` does: the checkpoint's half precision on a GPU, float32 on the CPU.
        dtype = resolve_dtype("auto", load_config(src, trust_remote_code), device)
        teacher_model = load_model(src, dtype=dtype, trust_remote_code=trust_remote_code)
        teacher_model = teacher_model.to(device).eval()
        computed = None
        if scores is None:
            scores = computed = compute_scores(
                teacher_model, importance_blocks, batch_size=calibration.batch_size, show_progress=show_progress
            )
        heldout = HeldOut(teacher_model, heldout_blocks, batch_size=calibration.batch_size,
                          need_teacher=ranking.rank_by == "kl")
        depth = DepthChooser(ranking.depth_strategy, teacher_model, scores, heldout, ranking.rank_by)
        with progress(transient=True) if show_progress else contextlib.nullcontext() as bar:
            ranked = rank_candidates(
                teacher_model, shortlist, scores, heldout, rank_by=ranking.rank_by, depth=depth,
                drop_layers=drop_layers, search_steps=ranking.search_steps, train_blocks=importance_blocks,
                lr=SEARCH_LR, batch_size=calibration.batch_size, seed=calibration.seed,
                progress=bar if show_progress else None,
            )  # fmt: skip
        del teacher_model
        record_heldout = {
            "samples": int(heldout_blocks.shape[0]),
            "seq_len": int(heldout_blocks.shape[1]),
            "follows_importance_blocks": int(importance_blocks.shape[0]),
            "seed": calibration.seed,
            "data": str(calibration.data),
        }

    best = ranked[0]
    record = search_record(model, teacher, request, ranking, found, ranked, record_heldout, depth.measurements)
    with atomic_dir(out, overwrite) as tmp:
        # The checkpoint and its search record appear together: prune into the temporary folder, add the record.
        pruning.prune_checkpoint(
            src, best.plan, tmp, overwrite=True, command=command, scores=computed, show_progress=show_progress
        )
        (tmp / SEARCH_FILE).write_text(json.dumps(record, indent=1) + "\n")
    info = summary(model, teacher, best.candidate.shape, best.plan.dropped_layers)
    info.update(out=str(out), search=record)
    return info


def search_record(
    model: str,
    teacher: Shape,
    request: Request,
    ranking: Ranking,
    found: Sequence[Candidate],
    ranked: Sequence[Ranked],
    heldout: dict[str, Any] | None,
    measurements: dict[str, Any],
) -> dict[str, Any]:
    """What ``search.json`` holds: the request, every candidate (score where evaluated), and the choice."""
    scored = {id(r.candidate): (rank, r) for rank, r in enumerate(ranked, 1)}
    rows = []
    for c in found:
        row = c.to_dict()
        if id(c) in scored:
            rank, r = scored[id(c)]
            row.update(rank=rank, drop_layers=r.drop_layers, score=None if math.isnan(r.score) else r.score)
        rows.append(row)
    return {
        "version": SEARCH_VERSION,
        "model": str(model),
        "teacher": {"shape": teacher.to_dict(), "params": teacher.counts()},
        **request.to_dict(),
        "ranking": {
            "top_k_candidates": ranking.top_k,
            "rank_by": ranking.rank_by,
            "depth_strategy": ranking.depth_strategy,
            "search_steps": ranking.search_steps,
            "search_lr": SEARCH_LR,
            "heldout": heldout,
        },
        "depth_measurements": measurements,
        "chosen": {**ranked[0].to_dict(), "score": None if math.isnan(ranked[0].score) else ranked[0].score},
        "candidates": rows,
    }


# --- glue for the `prune` verb -------------------------------------------------------------------------------


def refuse_explicit(flags: dict[str, Any]) -> None:
    """``--target`` chooses the shape itself: explicit sizes beside it would be silently ignored, so refuse."""
    given = [name for name, value in flags.items() if value is not None]
    if given:
        raise UserError(
            "--target searches the student shape itself",
            where=", ".join(given),
            fix="pass either --target / --active-target or explicit sizes, not both",
        )


def prune_to_target(
    model: str,
    teacher: Shape,
    *,
    target: str | None,
    active_target: str | None,
    axes: str,
    prune_heads: bool,
    tolerance: str | None,
    limits: Iterable[str],
    ranking: Ranking,
    dry_run: bool,
    out: str | Path | None,
    drop_layers: list[int] | None,
    scores_file: str | Path | None,
    calibration: Any,
    overwrite: bool,
    trust_remote_code: bool,
    command: str | None,
    show_progress: bool,
) -> dict[str, Any]:
    """``minitron prune --target``: the candidates (``dry_run``: shape arithmetic only) or the whole search."""
    request = Request.parse(
        teacher, target=target, active_target=active_target, axes=axes, prune_heads=prune_heads,
        tolerance=tolerance, limits=limits, drop_layers=drop_layers,
    )  # fmt: skip
    if dry_run:
        ranking.check()
        return dry_run_record(model, teacher, request)
    return run(
        model, teacher, request, ranking, out=out, drop_layers=drop_layers, scores_file=scores_file,
        calibration=calibration, overwrite=overwrite, trust_remote_code=trust_remote_code, command=command,
        show_progress=show_progress,
    )  # fmt: skip

"""Architecture search: from a parameter budget (``--target 4B``) to a student shape, and which layers to drop.

The search has three parts, each usable on its own:

1. :func:`enumerate_candidates` — shape arithmetic only, no weights: every shape on a hardware-friendly grid
   whose parameter count lies within ``--tolerance`` of the target. This is all ``--dry-run`` needs, so it
   runs on a folder holding nothing but ``config.json``.
2. :func:`rank_candidates` — with weights and calibration data: prune the teacher to each of the first
   ``--top-k-candidates`` shapes in memory and score it by LM loss (or KL to the teacher) on held-out tokens,
   optionally after ``--search-steps`` short distillation steps (the lightweight architecture search of
   Minitron, arXiv 2407.14679 §3: the best shape right after pruning is not always the best after
   retraining, and a few hundred steps are enough to tell them apart).
3. :func:`choose_drop_layers` — depth strategies: which ``n`` layers to remove.

Axes (``--axes``) and the dimensions they let shrink:

========== ==================================================================================
``width``  ``hidden`` (embedding channels) and ``ffn`` (MLP neurons; per expert for MoE); query
           ``heads`` only with ``--prune-heads``, uniformly within each GQA group, so every KV
           head keeps the same number of query heads and ``kv_heads`` / ``head_dim`` stay.
``depth``  ``layers``
``experts`` MoE only: the expert count (never below top-k) and each expert's ``ffn``.
========== ==================================================================================

Grid steps. Matrix dimensions are kept at multiples of a power of two so that the pruned GEMMs stay
tensor-core friendly: up to 128 for ``hidden`` and 256 for ``ffn``, halved until the dimension spans at
least 16 steps (``_MIN_STEPS``), so Llama-3.1-8B searches hidden in 128s and ffn in 256s, Granite-1B
(hidden 1024, expert ffn 512) in 64s and 32s, and the 64-wide test models in 4s. Layers move by one,
query heads by one per GQA group, experts by the largest power of two that leaves 16 steps (2 for 32 or 40
experts). MoE widths never step below 8 (transformers' grouped-GEMM expert kernels need 16-byte-aligned
rows). The teacher's own size is always on the grid even where it is not such a multiple.

Shrink limits (``--limit dim=fraction``: the largest fraction of a dimension one prune may remove). All
default to 0.5. The published guidance is to prune width moderately per step (ModelOpt's Minitron searcher
defaults to ≤ 40 % per width dimension and ≤ 20 % of layers), but the published Minitron students go
further: Minitron-4B (from Nemotron-8B) halves the attention heads and cuts the MLP by 44 %, and
Llama-3.1-Minitron-4B-Depth removes 16 of 32 layers. A 40 %/20 % default would exclude shapes the papers
ship, so 50 % is the default everywhere, and tighter limits are one flag away.

Ordering. Candidates come out in the order they are worth evaluating: more layers first (the papers found
width pruning beats depth pruning at these sizes), then more query heads (keeping heads was best for
Llama-3.1), then the most evenly spread cut (the smallest largest-fraction removed from hidden, ffn and
experts: the published shapes trim every width dimension moderately rather than one to its limit), then
closeness to the target. For each choice of the other dimensions only the ffn closest to the target is
kept: ffn is the finest knob, and its neighbours within tolerance differ by well under 1 % of the
parameters, so listing them would only crowd the ``--top-k-candidates`` evaluated.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape
from minitron.report_console import human

AXES = ("width", "depth", "experts")
DIMS = ("hidden", "ffn", "heads", "layers", "experts")
DEFAULT_LIMIT = 0.5
DEFAULT_TOLERANCE = 0.02
_MIN_STEPS = 16
_STEP_CAP = {"hidden": 128, "ffn": 256, "experts": 8}
_MOE_MIN_STEP = 8


# --- parsing the flags --------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?|\.\d+)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_FRACTION = re.compile(r"^\s*(\d*\.?\d+)\s*x\s*$", re.IGNORECASE)


def parse_count(text: str, teacher_count: int, flag: str = "--target") -> int:
    """``4B``, ``4.5B``, ``800M``, ``1.2e9`` → a parameter count; ``0.5x`` → that fraction of the teacher's.

    Refuses a fraction ≥ 1 and a count ≥ the teacher's: those are not prunes.
    """
    text = str(text)
    fraction = _FRACTION.match(text)
    if fraction:
        value = float(fraction.group(1))
        if not 0 < value < 1:
            raise UserError(
                f"a fraction of the teacher must be between 0 and 1, got {text!r}",
                where=flag,
                fix="pass e.g. 0.5x for half the teacher's parameters",
            )
        return round(value * teacher_count)
    match = _COUNT.match(text)
    if not match:
        raise UserError(
            f"cannot read {text!r} as a parameter count", where=flag, fix="pass e.g. 4B, 4.5B, 800M, 1.2e9 or 0.5x"
        )
    count = round(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if count <= 0:
        raise UserError(f"a parameter count must be positive, got {text!r}", where=flag)
    if count >= teacher_count:
        raise UserError(
            f"{text} ({count:,}) is not smaller than the teacher's {teacher_count:,}",
            where=flag,
            fix=f"pass a count below {human(teacher_count)}, or a fraction like 0.5x",
        )
    return count


def parse_tolerance(text: str | float) -> float:
    """``2%`` or ``0.02`` → 0.02."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UserError(
            f"cannot read {raw!r} as a tolerance", where="--tolerance", fix="pass e.g. 2% or 0.02"
        ) from None
    if not 0 < value < 0.5:
        raise UserError(f"tolerance must lie between 0 and 50%, got {raw!r}", where="--tolerance", fix="pass e.g. 2%")
    return value


def parse_limits(items: Iterable[str] = ()) -> dict[str, float]:
    """``["ffn=0.4", "layers=0.25"]`` → the shrink limit of every dimension (defaults filled in)."""
    limits = dict.fromkeys(DIMS, DEFAULT_LIMIT)
    for item in items:
        dim, sep, value = item.partition("=")
        dim = dim.strip()
        if not sep or dim not in limits:
            raise UserError(
                f"cannot read {item!r}", where="--limit", fix=f"pass dim=fraction with dim one of {', '.join(DIMS)}"
            )
        try:
            fraction = float(value)
        except ValueError:
            fraction = -1.0
        if not 0 <= fraction < 1:
            raise UserError(
                f"the largest fraction of {dim} to remove must be in [0, 1), got {value!r}",
                where="--limit",
                fix=f"pass e.g. {dim}=0.5",
            )
        limits[dim] = fraction
    return limits


def parse_axes(text: str | Sequence[str], teacher: Shape, prune_heads: bool = False) -> frozenset[str]:
    """``"width,depth"`` → the dimensions that may shrink, e.g. ``{"hidden", "ffn", "layers"}``."""
    names = [n.strip() for part in ([text] if isinstance(text, str) else text) for n in part.split(",") if n.strip()]
    unknown = [n for n in names if n not in AXES]
    if unknown or not names:
        raise UserError(
            f"unknown axis {', '.join(map(repr, unknown)) or '(none)'}",
            where="--axes",
            fix=f"choose from {', '.join(AXES)}",
        )
    if "experts" in names and not teacher.experts:
        raise UserError(
            f"{teacher.model_type} has no experts", where="--axes experts", fix="use --axes width and/or depth"
        )
    if prune_heads and "width" not in names:
        raise UserError("--prune-heads prunes width", where="--prune-heads", fix="add --axes width")
    dims = set()
    if "width" in names:
        dims |= {"hidden", "ffn"} | ({"heads"} if prune_heads else set())
    if "depth" in names:
        dims.add("layers")
    if "experts" in names:
        dims |= {"experts", "ffn"}
    return frozenset(dims)


# --- the budget ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What the student must weigh: total and/or active parameters per token, each within ``tolerance``."""

    total: int | None
    active: int | None
    tolerance: float = DEFAULT_TOLERANCE

    @classmethod
    def parse(
        cls, teacher: Shape, target: str | None, active_target: str | None = None, tolerance: str | float = "2%"
    ) -> "Budget":
        if target is None and active_target is None:
            raise UserError("no parameter budget", where="--target", fix="pass --target 4B (or 0.5x)")
        counts = teacher.counts()
        if active_target is not None and not teacher.experts:
            raise UserError(
                f"{teacher.model_type} is dense: every parameter is active",
                where="--active-target",
                fix="use --target for dense models",
            )
        return cls(
            total=None if target is None else parse_count(target, counts["total"], "--target"),
            active=None if active_target is None else parse_count(active_target, counts["active"], "--active-target"),
            tolerance=parse_tolerance(tolerance),
        )

    def deviation(self, total: int, active: int) -> float:
        """The largest relative distance from a target; within budget iff ≤ ``tolerance``."""
        off = [abs(total - self.total) / self.total] if self.total else []
        off += [abs(active - self.active) / self.active] if self.active else []
        return max(off)

    def describe(self) -> str:
        return _budget_text(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "active": self.active, "tolerance": self.tolerance}


# --- the grid -----------------------------------------------------------------------------------------------


def grid_step(dim: str, size: int, moe: bool = False) -> int:
    """Hardware-friendly step of a dimension: a power of two ≤ the cap, small enough for ``_MIN_STEPS`` steps.

    MoE widths never go below 8: transformers' grouped-GEMM expert kernels need rows aligned to 16 bytes,
    i.e. hidden and expert ffn multiples of 8 in bf16.
    """
    if dim in ("layers", "heads"):
        return 1
    floor = _MOE_MIN_STEP if moe and dim in ("hidden", "ffn") else 1
    step = _STEP_CAP[dim]
    while step > floor and size // step < _MIN_STEPS:
        step //= 2
    return step


def _grid(dim: str, teacher: Shape, limit: float) -> list[int]:
    """Values a dimension may take, largest (the teacher's) first."""
    if dim == "heads":
        # Query heads shrink uniformly inside GQA groups: each KV head keeps `per_group` query heads.
        group = teacher.heads // teacher.kv_heads
        lowest = max(1, math.ceil(group * (1 - limit)))
        return [teacher.kv_heads * g for g in range(group, lowest - 1, -1)]
    size = getattr(teacher, dim)
    step = grid_step(dim, size, bool(teacher.experts))
    lowest = max(step, math.ceil(size * (1 - limit)))
    if dim == "experts":
        lowest = max(lowest, teacher.top_k)  # a token must still find top-k experts
    return [size] + [v for v in range(size - size % step, lowest - 1, -step) if v != size]


@dataclass(frozen=True)
class SearchSpace:
    """The grid: for every dimension the values it may take (one value, the teacher's, if it is not searched)."""

    teacher: Shape
    dims: frozenset[str]
    limits: dict[str, float]
    values: dict[str, list[int]]

    @classmethod
    def build(cls, teacher: Shape, dims: frozenset[str], limits: dict[str, float] | None = None) -> "SearchSpace":
        limits = {**dict.fromkeys(DIMS, DEFAULT_LIMIT), **(limits or {})}
        values = {d: _grid(d, teacher, limits[d]) if d in dims else [getattr(teacher, d)] for d in DIMS}
        return cls(teacher, dims, limits, values)

    def to_dict(self) -> dict[str, Any]:
        return {
            d: {
                "step": grid_step(d, getattr(self.teacher, d), bool(self.teacher.experts))
                if d != "heads"
                else self.teacher.kv_heads,
                "max_shrink": self.limits[d],
                "min": min(self.values[d]),
                "max": max(self.values[d]),
                "choices": len(self.values[d]),
            }
            for d in DIMS
            if d in self.dims
        }


# --- enumeration --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Candidate:
    """One student shape on the grid, with its exact parameter counts."""

    shape: Shape
    total: int
    active: int
    deviation: float

    def shrink(self, teacher: Shape) -> float:
        """The largest fraction removed from any width dimension (hidden, ffn, experts)."""
        dims = ["hidden", "ffn"] + (["experts"] if teacher.experts else [])
        return max(1 - getattr(self.shape, d) / getattr(teacher, d) for d in dims)

    def order_key(self, teacher: Shape) -> tuple:
        s = self.shape
        return (-s.layers, -s.heads, round(self.shrink(teacher), 6), self.deviation, -s.hidden, -s.experts, -s.ffn)

    def to_dict(self) -> dict[str, Any]:
        s = self.shape
        return {
            "hidden": s.hidden,
            "ffn": s.ffn,
            "layers": s.layers,
            "heads": s.heads,
            "kv_heads": s.kv_heads,
            "head_dim": s.head_dim,
            "experts": s.experts,
            "top_k": s.top_k,
            "params": self.total,
            "active_params": self.active,
            "deviation": round(self.deviation, 6),
        }


class _Counter:
    """Exact counts of many shapes that differ only in ``layers`` and ``ffn``, by one bilinear formula.

    Every tensor has at most one ffn axis and decoder layers repeat, so for fixed hidden / heads / experts
    ``count = globals + layers × (base + ffn × per_neuron)``, for the total and the active count alike. Three
    :meth:`Shape.counts` calls per coarse shape replace one per grid point (the grid can hold ~10⁵ points).
    """

    def __init__(self, shape: Shape):
        c00 = shape.replace(layers=0, ffn=0).counts()
        c10 = shape.replace(layers=1, ffn=0).counts()
        c11 = shape.replace(layers=1, ffn=1).counts()
        self.coef = {
            k: (c00[k], c10[k] - c00[k], c11[k] - c10[k]) for k in ("total", "active")
        }

    def __call__(self, layers: int, ffn: int) -> tuple[int, int]:
        (g, b, n), (ga, ba, na) = self.coef["total"], self.coef["active"]
        return g + layers * (b + ffn * n), ga + layers * (ba + ffn * na)


def enumerate_candidates(teacher: Shape, budget: Budget, space: SearchSpace) -> list[Candidate]:
    """Every grid shape within the budget (one ffn per choice of the other dimensions), best first.

    Raises :class:`UserError` when none is: saying which limit blocks the target and what to relax, or how far
    the nearest grid shape is when the grid is too coarse for the tolerance.
    """
    found, nearest = [], None
    coarse = ["hidden", "heads", "experts"]
    family = FAMILIES[teacher.model_type]
    for hidden, heads, experts in itertools.product(*(space.values[d] for d in coarse)):
        if not family.loads_width(hidden, heads):
            continue
        counter = _Counter(teacher.replace(hidden=hidden, heads=heads, experts=experts))
        for layers in space.values["layers"]:
            best = None
            for ffn in space.values["ffn"]:
                total, active = counter(layers, ffn)
                dev = budget.deviation(total, active)
                identity = (hidden, heads, experts, layers, ffn) == (
                    teacher.hidden, teacher.heads, teacher.experts, teacher.layers, teacher.ffn
                )
                if identity:
                    continue
                if nearest is None or dev < nearest[0]:
                    nearest = (dev, total, active)
                if dev <= budget.tolerance and (best is None or dev < best[0]):
                    best = (dev, ffn)
            if best is not None:
                shape = teacher.replace(hidden=hidden, heads=heads, experts=experts, layers=layers, ffn=best[1])
                # The listed numbers come from the one counting rule, not from the shortcut.
                total, active = shape.counts()["total"], shape.counts()["active"]
                found.append(Candidate(shape, total, active, budget.deviation(total, active)))
    if not found:
        raise _unreachable(teacher, budget, space, nearest)
    return sorted(found, key=lambda c: c.order_key(teacher))


# --- explaining an unreachable target -----------------------------------------------------------------------


def _smallest(teacher: Shape, space: SearchSpace) -> tuple[Shape, dict[str, int]]:
    shape = teacher.replace(**{d: min(space.values[d]) for d in DIMS})
    return shape, shape.counts()


def _too_big(budget: Budget, counts: dict[str, int]) -> bool:
    return bool(
        (budget.total and counts["total"] > budget.total * (1 + budget.tolerance))
        or (budget.active and counts["active"] > budget.active * (1 + budget.tolerance))
    )


def _unreachable(teacher: Shape, budget: Budget, space: SearchSpace, nearest) -> UserError:
    smallest, counts = _smallest(teacher, space)
    if _too_big(budget, counts):
        floor = ", ".join(f"{d} ≥ {getattr(smallest, d)}" for d in DIMS if d in space.dims)
        fixes = []
        for dim in sorted(space.dims):
            # The least relaxation of this one limit that brings the smallest shape under the budget.
            for limit in (x / 100 for x in range(int(space.limits[dim] * 100) + 5, 100, 5)):
                trial = SearchSpace.build(teacher, space.dims, {**space.limits, dim: limit})
                if not _too_big(budget, _smallest(teacher, trial)[1]):
                    fixes.append(f"--limit {dim}={limit:.2f}")
                    break
        for axis, dims in (("width", {"hidden", "ffn"}), ("depth", {"layers"}), ("experts", {"experts", "ffn"})):
            if dims <= space.dims or (axis == "experts" and not teacher.experts):
                continue
            trial = SearchSpace.build(teacher, space.dims | dims, space.limits)
            if not _too_big(budget, _smallest(teacher, trial)[1]):
                fixes.append(f"add --axes {axis}")
        blocking = ", ".join(f"{d} {space.limits[d]:.0%}" for d in DIMS if d in space.dims)
        active = f", {human(counts['active'])} active" if teacher.experts else ""
        return UserError(
            f"target {budget.describe()} is below the smallest shape the shrink limits allow "
            f"({human(counts['total'])} params{active}, with {floor}; limits: at most {blocking} removed)",
            where="--target" if budget.total and counts["total"] > budget.total * (1 + budget.tolerance)
            else "--active-target",
            fix=("relax: " + " or ".join(fixes)) if fixes else "aim higher: no single relaxation reaches it",
        )
    if nearest is None:
        return UserError(
            "the search space holds no shape but the teacher's", where="--axes", fix="add axes or relax --limit"
        )
    dev, total, active = nearest
    active_text = f" ({human(active)} active)" if teacher.experts else ""
    return UserError(
        f"no grid shape lies within ±{budget.tolerance:.0%} of {budget.describe().rsplit(' ±', 1)[0]}; "
        f"the nearest has {human(total)} params{active_text}, {dev:.1%} off",
        where="--target" if budget.total else "--active-target",
        fix=f"widen --tolerance to {math.ceil(dev * 1000) / 10:.1f}%, or add an axis to --axes for a finer grid",
    )


# --- scoring a model on held-out tokens ---------------------------------------------------------------------

RANK_BY = ("loss", "kl")
DEPTH_STRATEGIES = ("window", "block", "loss")


def _head_input(model: Any, ids: Any) -> Any:
    """The hidden states that feed the output head ``[B, T, D]``: the losses apply the head themselves, in
    chunks, so no ``tokens × vocab`` logits are ever materialised."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


class HeldOut:
    """Held-out token blocks ``[N, T]`` and, for KL, the teacher's head inputs on them (computed once).

    Scores are sums over tokens divided by the token count of the whole set, so batching does not change them.
    """

    def __init__(self, teacher: Any, blocks: Any, *, batch_size: int = 4, need_teacher: bool = False):
        self.blocks, self.batch_size = blocks, max(1, batch_size)
        self.teacher_head = None
        self.teacher_hidden: list[Any] = []
        if need_teacher:
            device = next(teacher.parameters()).device
            with torch.no_grad():
                self.teacher_hidden = [_head_input(teacher, b.to(device)) for b in self.batches()]
            from minitron.losses import output_head

            self.teacher_head = output_head(teacher)

    def batches(self) -> list[Any]:
        return list(self.blocks.split(self.batch_size))

    def score(self, model: Any, rank_by: str) -> float:
        """Mean LM loss (next-token cross entropy) or mean KL(teacher ‖ model) per token; lower is better."""
        from minitron.losses import forward_kl, lm_loss, output_head

        head, divisor = output_head(model)
        device = head.device
        total, count = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(self.batches()):
                batch = batch.to(device)
                hidden = _head_input(model, batch)
                if rank_by == "loss":
                    # Position t predicts token t+1: drop the last hidden state and the first label.
                    total += float(lm_loss(hidden[:, :-1], head, batch[:, 1:], divisor=divisor, normalizer=1.0))
                    count += batch[:, 1:].numel()
                else:
                    t_head, t_divisor = self.teacher_head
                    total += float(
                        forward_kl(
                            hidden, head, self.teacher_hidden[k], t_head,
                            student_divisor=divisor, teacher_divisor=t_divisor, normalizer=1.0,
                        )
                    )
                    count += batch.numel()
        return total / count


# --- depth strategies ---------------------------------------------------------------------------------------


class _PassThrough(nn.Module):
    """Stands in for a decoder layer and returns its input: the layer is skipped, nothing is copied."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Skipping:
    """Context manager: ``model`` runs with some decoder layers replaced by pass-throughs, then restored."""

    def __init__(self, model: Any, layers: Iterable[int]):
        self.stack, self.layers = model.base_model.layers, sorted(set(layers))

    def __enter__(self):
        self.saved = {i: self.stack[i] for i in self.layers}
        for i in self.layers:
            self.stack[i] = _PassThrough()

    def __exit__(self, *exc):
        for i, layer in self.saved.items():
            self.stack[i] = layer


def layer_loss_rise(model: Any, heldout: HeldOut) -> list[float]:
    """For each layer, how much the held-out LM loss rises when that layer alone is skipped."""
    base = heldout.score(model, "loss")
    rises = []
    for i in range(len(model.base_model.layers)):
        with _Skipping(model, [i]):
            rises.append(heldout.score(model, "loss") - base)
    return rises


def window_losses(model: Any, heldout: HeldOut, n_drop: int, rank_by: str) -> list[float]:
    """Held-out score of the teacher with each contiguous window of ``n_drop`` layers skipped (by start)."""
    n_layers = len(model.base_model.layers)
    out = []
    for start in range(n_layers - n_drop + 1):
        with _Skipping(model, range(start, start + n_drop)):
            out.append(heldout.score(model, rank_by))
    return out


def _lowest(values: Sequence[float], n: int) -> list[int]:
    # Stable: among equal scores the lower layer index goes first, so the choice is reproducible.
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:n])


class DepthChooser:
    """Which ``n`` layers to drop, by one of the strategies, with every measurement done at most once.

    * ``block``: the ``n`` layers of lowest block importance (1 − cos between a layer's input and output,
      ``Scores.blocks``). Computed once on the full teacher, as in 2407.14679 §2.2, not re-measured after
      each removal: re-measuring costs a calibration pass per dropped layer and the paper ranks from one pass.
    * ``loss``: the ``n`` layers whose removal alone raises the LM loss least (``Scores.layer_loss`` when the
      importance stage measured it, else measured here on the held-out tokens, one pass per layer).
    * ``window``: the contiguous run of ``n`` layers whose joint removal hurts the held-out LM loss (or KL to
      the teacher, with ``--rank-by kl``) least. Layers interact: the papers found dropping one contiguous
      block (Llama-3.1-Minitron-4B-Depth drops 16–31) beats dropping the individually least important ones.
    """

    def __init__(self, strategy: str, teacher: Any, scores: Any, heldout: HeldOut | None, rank_by: str = "loss"):
        if strategy not in DEPTH_STRATEGIES:
            raise UserError(
                f"unknown depth strategy {strategy!r}",
                where="--depth-strategy",
                fix=f"choose {', '.join(DEPTH_STRATEGIES)}",
            )
        self.strategy, self.teacher, self.scores = strategy, teacher, scores
        self.heldout, self.rank_by = heldout, rank_by
        self._cache: dict[int, list[int]] = {}
        self._layer_loss: list[float] | None = None
        self.measurements: dict[str, Any] = {}

    def __call__(self, n_drop: int) -> list[int]:
        if n_drop <= 0:
            return []
        if n_drop not in self._cache:
            self._cache[n_drop] = self._choose(n_drop)
        return self._cache[n_drop]

    def _choose(self, n_drop: int) -> list[int]:
        if self.strategy == "block":
            if self.scores is None or "blocks" not in self.scores.tensors:
                raise UserError("block importance needs scores with 'blocks'", where="--depth-strategy block",
                                fix="pass --scores from `minitron importance`, or use --depth-strategy window")
            blocks = self.scores.tensors["blocks"].double().tolist()
            self.measurements["blocks"] = blocks
            return _lowest(blocks, n_drop)
        if self.strategy == "loss":
            if self._layer_loss is None:
                if self.scores is not None and "layer_loss" in self.scores.tensors:
                    self._layer_loss = self.scores.tensors["layer_loss"].double().tolist()
                else:
                    self._layer_loss = layer_loss_rise(self.teacher, self._need_heldout())
                self.measurements["layer_loss"] = self._layer_loss
            return _lowest(self._layer_loss, n_drop)
        scores = window_losses(self.teacher, self._need_heldout(), n_drop, self.rank_by)
        self.measurements[f"window_{n_drop}"] = scores
        start = min(range(len(scores)), key=lambda s: (scores[s], s))
        return list(range(start, start + n_drop))

    def _need_heldout(self) -> HeldOut:
        if self.heldout is None:
            raise UserError(f"depth strategy {self.strategy!r} measures held-out loss", where="--depth-strategy",
                            fix="pass --calib DATA, or use --depth-strategy block with --scores")
        return self.heldout


# --- ranking the candidates ---------------------------------------------------------------------------------


@dataclass
class Ranked:
    """A candidate after evaluation: which layers it drops and its held-out score (lower is better)."""

    candidate: Candidate
    drop_layers: list[int]
    score: float
    plan: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {**self.candidate.to_dict(), "drop_layers": self.drop_layers, "score": self.score}


def short_distill(
    student: Any, teacher: Any, blocks: Any, *, steps: int, lr: float, batch_size: int, seed: int
) -> None:
    """``steps`` steps of logit distillation (forward KL, τ = 1, AdamW, constant LR, grad-norm clip 1).

    Just enough retraining to let the candidates recover before they are compared (2407.14679 §3: the ranking
    right after pruning changes after a few hundred steps, then stays put).
    """
    from minitron.losses import forward_kl, output_head

    torch.manual_seed(seed)
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(student.parameters()).device
    t_head, t_divisor = output_head(teacher)
    student.train()
    # A seeded order of the training blocks, the same for every candidate so that they see the same tokens.
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    batches = blocks[order].split(max(1, batch_size))
    for step in range(steps):
        ids = batches[step % len(batches)].to(device)
        with torch.no_grad():
            t_hidden = _head_input(teacher, ids)
        s_head, s_divisor = output_head(student)
        loss = forward_kl(_head_input(student, ids), s_head, t_hidden, t_head,
                          student_divisor=s_divisor, teacher_divisor=t_divisor)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    student.eval()


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


# --- what the CLI shows and records ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """The search flags of ``minitron prune``, parsed against the teacher's shape."""

    budget: Budget
    space: SearchSpace
    axes: tuple[str, ...]

    @classmethod
    def parse(
        cls,
        teacher: Shape,
        *,
        target: str | None,
        active_target: str | None = None,
        axes: str | Sequence[str] = "width",
        prune_heads: bool = False,
        tolerance: str | float = "2%",
        limits: Iterable[str] = (),
        drop_layers: list[int] | None = None,
    ) -> "Request":
        dims = parse_axes(axes, teacher, prune_heads)
        if drop_layers is not None and "layers" in dims:
            raise UserError("--drop-layers fixes the depth", where="--axes depth",
                            fix="pass either --drop-layers or --axes depth, not both")
        space = SearchSpace.build(teacher, dims, parse_limits(limits))
        if drop_layers is not None:
            # Explicit layers to drop fix the depth; the search then only shapes the width.
            space.values["layers"] = [teacher.layers - len(drop_layers)]
        names = [n.strip() for part in ([axes] if isinstance(axes, str) else axes) for n in part.split(",")]
        names = [n for n in names if n]
        return cls(Budget.parse(teacher, target, active_target, tolerance), space, tuple(dict.fromkeys(names)))

    def candidates(self) -> list[Candidate]:
        return enumerate_candidates(self.space.teacher, self.budget, self.space)

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget.to_dict(), "axes": list(self.axes), "search_space": self.space.to_dict()}


def dry_run_record(model: str, teacher: Shape, request: Request) -> dict[str, Any]:
    """The ``--dry-run --json`` record: teacher, budget, grid and every candidate, best-first."""
    found = request.candidates()
    return {
        "model": str(model),
        "family": teacher.model_type,
        "teacher": {"shape": teacher.to_dict(), "params": teacher.counts()},
        **request.to_dict(),
        "count": len(found),
        "candidates": [c.to_dict() for c in found],
    }


def candidates_table(rows: Sequence[dict[str, Any]], teacher: Shape, title: str, limit: int | None = 20):
    """A rich table of candidate records (from :meth:`Candidate.to_dict` / :meth:`Ranked.to_dict`)."""
    from rich.table import Table

    scored = any(r.get("score") is not None for r in rows)
    table = Table(title=title, title_justify="left")
    columns = ["#", "hidden", "ffn", "layers", "heads", "kv"]
    columns += ["experts"] if teacher.experts else []
    columns += ["params"] + (["active"] if teacher.experts else []) + ["Δ target"]
    columns += ["dropped layers", "score"] if scored else []
    for name in columns:
        table.add_column(name, justify="left" if name == "dropped layers" else "right")
    for i, r in enumerate(rows[:limit] if limit else rows, 1):
        cells = [str(i), str(r["hidden"]), str(r["ffn"]), str(r["layers"]), str(r["heads"]), str(r["kv_heads"])]
        cells += [str(r["experts"])] if teacher.experts else []
        cells += [human(r["params"])] + ([human(r["active_params"])] if teacher.experts else [])
        cells += [f"{r['deviation']:.2%}"]
        if scored:
            drop = r.get("drop_layers") or []
            cells += [_ranges(drop) if drop else "—", "—" if r.get("score") is None else f"{r['score']:.4f}"]
        table.add_row(*cells)
    if limit and len(rows) > limit:
        table.caption = f"… and {len(rows) - limit} more (--json lists all)"
    return table


def _ranges(values: Sequence[int]) -> str:
    """[16, 17, 18, 31] → '16-18,31'."""
    parts: list[str] = []
    for v in values:
        if parts and v == int(parts[-1].split("-")[-1]) + 1:
            parts[-1] = f"{parts[-1].split('-')[0]}-{v}"
        else:
            parts.append(str(v))
    return ",".join(parts)


# --- the `minitron prune --target` run ----------------------------------------------------------------------

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


def _calibration_blocks(src: Any, calibration: Any, scores: Any, heldout: int, trust_remote_code: bool):
    """(importance blocks, held-out blocks) from one seeded stream of ``--calib`` data.

    The held-out blocks are the ones that *follow* the importance blocks in the same stream (token_blocks
    packs documents in a seeded order, so asking for more blocks only appends), so they never repeat a block
    the scores were computed on. With ``--scores``, the stream is laid out as the scores' own settings say;
    it is disjoint from their blocks when ``--calib`` and ``--seed`` are those the scores were computed with.
    """
    from minitron.data import token_blocks
    from minitron.families import load_tokenizer

    settings = (scores.meta.get("settings", {}) if scores is not None else {}) or {}
    samples = int(settings.get("samples", calibration.samples))
    seq_len = int(settings.get("seq_len", calibration.seq_len))
    tokenizer = load_tokenizer(
        src, trust_remote_code=trust_remote_code, fix="--calib needs the teacher's tokenizer files beside its weights"
    )
    blocks = token_blocks(
        tokenizer, calibration.data, seq_len=seq_len, samples=samples + heldout, seed=calibration.seed
    )
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
    from transformers import AutoModelForCausalLM

    from minitron import prune as pruning
    from minitron.artifacts import atomic_dir, check_output_dir
    from minitron.families import load_config
    from minitron.importance import Scores, compute_scores, resolve_dtype
    from minitron.plan import make_plan, summary
    from minitron.report_console import progress

    ranking.check()
    found = request.candidates()
    shortlist = found[: ranking.top_k]
    if out is None:
        raise UserError("no output folder", where="-o", fix="pass -o OUT, or --dry-run to list the candidates")
    check_output_dir(out, overwrite)
    src = pruning.local_checkpoint(model)
    pruning.teacher_index(src)  # a corrupt checkpoint is refused before any calibration, not after
    scores = Scores.load(scores_file, expect=teacher) if scores_file is not None else None
    if _needs_data(shortlist, teacher, ranking, scores) and calibration is None:
        raise UserError(
            f"ranking {len(shortlist)} candidate(s) needs held-out calibration tokens",
            where="--calib",
            fix="pass --calib DATA; or --scores FILE with --top-k-candidates 1 to take the first candidate unranked",
        )

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
            src, calibration, scores, ranking.heldout_samples, trust_remote_code
        )
        # As `minitron importance` does: the checkpoint's half precision on a GPU, float32 on the CPU.
        dtype = resolve_dtype("auto", load_config(src, trust_remote_code), device)
        teacher_model = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
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


# --- glue for the `prune` verb ------------------------------------------------------------------------------


def refuse_explicit(flags: dict[str, Any]) -> None:
    """``--target`` chooses the shape itself: explicit sizes beside it would be silently ignored, so refuse."""
    given = [name for name, value in flags.items() if value is not None]
    if given:
        raise UserError(
            "--target searches the student shape itself",
            where=", ".join(given),
            fix="pass either --target / --active-target or explicit sizes, not both",
        )


def render(info: dict[str, Any], teacher: Shape) -> list[Any]:
    """The rich renderables the CLI prints for a dry run (the candidates) or a search (ranking + summary)."""
    from minitron.plan import summary_table

    if "search" not in info:
        title = f"{info['count']} candidates for {_budget_text(info['budget'])} ({', '.join(info['axes'])})"
        return [candidates_table(info["candidates"], teacher, title)]
    record = info["search"]
    ranked = sorted((c for c in record["candidates"] if "rank" in c), key=lambda c: c["rank"])
    how = record["ranking"]
    steps = f", after {how['search_steps']} distillation steps" if how["search_steps"] else ""
    title = f"top {len(ranked)} of {len(record['candidates'])} candidates by held-out {how['rank_by']}{steps}"
    return [candidates_table(ranked, teacher, title, limit=None), summary_table(info)]


def _budget_text(budget: dict[str, Any]) -> str:
    parts = [f"{human(budget['total'])} params"] if budget["total"] else []
    parts += [f"{human(budget['active'])} active"] if budget["active"] else []
    return f"{' and '.join(parts)} ±{budget['tolerance']:.0%}"


def prune_to_target(
    model: str,
    teacher: Shape,
    *,
    target: str | None,
    active_target: str | None,
    axes: str,
    prune_heads: bool,
    tolerance: str,
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

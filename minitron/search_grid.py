"""Candidate student shapes for a parameter budget: shape arithmetic only, no weights.

From the ``minitron prune --target`` flags (:class:`Request`) to every shape on a hardware-friendly grid whose
parameter count lies within the tolerance (:mod:`minitron.search_budget`) of the target, best-first, or a
one-line reason why none is. This is all ``--dry-run`` needs, so it runs on a folder holding nothing but
``config.json``.

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
(hidden 1024, expert ffn 512) in 64s and 32s, and the 64-wide test models in 4s. Where the family's config
needs hidden to be a multiple of the query-head count (Llama), the hidden step is also such a multiple. Layers move by one,
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
parameters, so listing them would only crowd the ``--top-k-candidates`` evaluated. One more is kept when it
is within tolerance: the ffn cut by the same fraction as hidden (Minitron-8B's uniform cut).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape
from minitron.report_console import human
from minitron.search_budget import Budget

AXES = ("width", "depth", "experts")
DIMS = ("hidden", "ffn", "heads", "layers", "experts")
DEFAULT_LIMIT = 0.5
_MIN_STEPS = 16
_STEP_CAP = {"hidden": 128, "ffn": 256, "experts": 8}
_MOE_MIN_STEP = 8


# --- parsing the flags ---------------------------------------------------------------------------------------


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


# --- the grid ------------------------------------------------------------------------------------------------


def grid_step(dim: str, size: int, moe: bool = False, multiple: int = 1) -> int:
    """Hardware-friendly step of a dimension: a power of two ≤ the cap, small enough for ``_MIN_STEPS`` steps.

    MoE widths never go below 8: transformers' grouped-GEMM expert kernels need rows aligned to 16 bytes,
    i.e. hidden and expert ffn multiples of 8 in bf16. ``multiple``: every value must also be a multiple of
    this (``hidden`` of the query-head count where the family's config demands it); the step is then the
    least common multiple of the two, and the power of two shrinks until that still spans ``_MIN_STEPS``.
    Llama-3.2-3B (hidden 3072, 24 heads) thus searches hidden in 192s rather than 384s (8 values), and the
    bundled teacher (320, 10 heads) in 20s rather than 80s (only 240 and 160 within a 50 % cut).
    """
    if dim in ("layers", "heads"):
        return 1
    floor = _MOE_MIN_STEP if moe and dim in ("hidden", "ffn") else 1
    step = _STEP_CAP[dim]
    while step > floor and size // math.lcm(step, multiple) < _MIN_STEPS:
        step //= 2
    return math.lcm(step, multiple)


def _multiple(dim: str, teacher: Shape) -> int:
    """What every value of ``dim`` must be a multiple of for the family's config to load it."""
    if dim == "hidden" and FAMILIES[teacher.model_type].hidden_multiple_of_heads:
        return teacher.heads
    return 1


def _grid(dim: str, teacher: Shape, limit: float) -> list[int]:
    """Values a dimension may take, largest (the teacher's) first."""
    if dim == "heads":
        # Query heads shrink uniformly inside GQA groups: each KV head keeps `per_group` query heads.
        group = teacher.heads // teacher.kv_heads
        lowest = max(1, math.ceil(group * (1 - limit)))
        return [teacher.kv_heads * g for g in range(group, lowest - 1, -1)]
    size = getattr(teacher, dim)
    step = grid_step(dim, size, bool(teacher.experts), _multiple(dim, teacher))
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
                "step": grid_step(d, getattr(self.teacher, d), bool(self.teacher.experts), _multiple(d, self.teacher))
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


# --- enumeration ---------------------------------------------------------------------------------------------


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
            picks = [] if best is None else [best[1]]
            even = _even_ffn(teacher, hidden, space)
            if even is not None and even not in picks and budget.deviation(*counter(layers, even)) <= budget.tolerance:
                picks.append(even)
            for ffn in picks:
                shape = teacher.replace(hidden=hidden, heads=heads, experts=experts, layers=layers, ffn=ffn)
                # The listed numbers come from the one counting rule, not from the shortcut.
                total, active = shape.counts()["total"], shape.counts()["active"]
                found.append(Candidate(shape, total, active, budget.deviation(total, active)))
    if not found:
        raise _unreachable(teacher, budget, space, nearest)
    return sorted(found, key=lambda c: c.order_key(teacher))


def _even_ffn(teacher: Shape, hidden: int, space: SearchSpace) -> int | None:
    """The ffn cut by the same fraction as ``hidden``, where it is on the grid: the uniform width cut that
    Minitron-8B is (Nemotron-4 15B's hidden 6144 → 4096 and MLP 24576 → 16384, both to 2/3), listed beside
    the ffn closest to the target, which at hidden 4096 and an 8B target is 15360."""
    if hidden == teacher.hidden or (teacher.ffn * hidden) % teacher.hidden:
        return None
    ffn = teacher.ffn * hidden // teacher.hidden
    return ffn if ffn in space.values["ffn"] else None


# --- explaining an unreachable target ------------------------------------------------------------------------


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
        f"no grid shape lies within {budget.describe()}; "
        f"the nearest has {human(total)} params{active_text}, {dev:.1%} off",
        where="--target" if budget.total else "--active-target",
        fix=f"widen --tolerance to {math.ceil(dev * 1000) / 10:.1f}%, or add an axis to --axes for a finer grid",
    )


# --- the request: the flags of `minitron prune --target` together --------------------------------------------


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
        tolerance: str | float | None = None,
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

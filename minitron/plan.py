"""The pruning plan: which units of the teacher the student keeps.

A :class:`Plan` names, in teacher numbering, the embedding channels kept for the whole model (the residual
stream is shared by every layer, so there is one set) and, for every kept layer, its kept query heads,
KV groups, MLP neurons and experts. It is made from importance scores by :func:`make_plan`, saved as
``plan.json`` beside the pruned checkpoint, and applied by :mod:`minitron.prune`.

Choices worth knowing:

* **Heads stay inside their GQA group.** Query head ``h`` reads the keys and values of group
  ``h // (heads / kv_heads)``. The student keeps ``kv_heads'`` whole groups (``--kv-heads``, by
  ``kv_groups.{i}`` scores) and the same number ``heads' / kv_heads'`` of query heads in each of them (by
  ``heads.{i}`` scores), listed group by group, so that the student's own grouping rule maps each kept
  query head onto the KV group it read in the teacher.
* **Top-k is never changed silently.** Keeping fewer experts than the router's top-k is refused unless the
  caller also asks for a smaller top-k (``--top-k``): a different top-k changes what every token computes
  and its active parameter count, which must be the user's decision, not a side effect.
* **Ties are broken by the lower index** (a stable sort), so the same scores always give the same plan.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape

PLAN_VERSION = 1

# The command-line flag behind each Shape field, so that errors name what the user typed.
FLAGS = {
    "hidden": "--hidden-size",
    "ffn": "--ffn-size",
    "layers": "--layers",
    "heads": "--heads",
    "kv_heads": "--kv-heads",
    "experts": "--experts",
    "top_k": "--top-k",
}
# Shape fields that pruning cannot change.
FIXED = ("model_type", "head_dim", "vocab", "tied", "attention_bias", "mlp_bias")
NEED_SCORES = "pass --scores FILE (from `minitron importance`) or --calib DATA to compute them"


def flag(field_name: str, shape: Shape) -> str:
    return "--expert-ffn-size" if field_name == "ffn" and shape.experts else FLAGS[field_name]


# --- the student shape ---------------------------------------------------------------------------------------


def parse_layers(text: str, n_layers: int) -> list[int]:
    """``"16-31"`` or ``"3,5,10-12"`` (inclusive ranges, teacher numbering) → sorted unique layer indices."""
    where = f"--drop-layers {text}"
    layers: set[int] = set()
    for part in text.replace(" ", "").split(","):
        first, dash, last = part.partition("-")
        # "3-" or "-5" is an open range, not layer 3: refused rather than guessed.
        if not first.isdigit() or (dash and not last.isdigit()):
            raise UserError(f"{part!r} is not a layer or a range", where=where,
                            fix=f"write layers and closed ranges like 16-31 or 3,5,10-12 (layers 0-{n_layers - 1})")
        lo, hi = int(first), int(last or first)
        if lo > hi:
            raise UserError(f"range {part} runs backwards", where=where, fix=f"write it as {hi}-{lo}")
        if lo < 0 or hi >= n_layers:
            raise UserError(f"layer {hi if hi >= n_layers else lo} does not exist", where=where,
                            fix=f"the model has layers 0-{n_layers - 1}")
        layers.update(range(lo, hi + 1))
    if len(layers) >= n_layers:
        raise UserError("this drops every layer", where=where, fix="keep at least one layer")
    return sorted(layers)


def student_shape(
    teacher: Shape,
    *,
    hidden: int | None = None,
    ffn: int | None = None,
    heads: int | None = None,
    kv_heads: int | None = None,
    layers: int | None = None,
    experts: int | None = None,
    expert_ffn: int | None = None,
    top_k: int | None = None,
    drop_layers: list[int] | None = None,
) -> Shape:
    """The student :class:`Shape` asked for by explicit flags; unset fields keep the teacher's value.

    ``--kv-heads`` alone removes whole groups (their query heads go with them); ``--heads`` alone keeps every
    group and removes query heads inside each. ``ffn`` is the dense MLP width, ``expert_ffn`` each expert's:
    each flag is refused on the other kind of model, so that neither is silently ignored.
    """
    if teacher.experts and ffn is not None:
        raise UserError("this is an MoE model", where="--ffn-size", fix="use --expert-ffn-size for the experts' width")
    if not teacher.experts and (experts, expert_ffn, top_k) != (None, None, None):
        raise UserError(f"{teacher.model_type} has no experts", where="--experts/--expert-ffn-size/--top-k",
                        fix="these flags are for MoE models; use --ffn-size for the MLP width")
    ffn = expert_ffn if teacher.experts else ffn
    if drop_layers is not None:
        implied = teacher.layers - len(drop_layers)
        if layers is not None and layers != implied:
            raise UserError(
                f"--layers {layers} disagrees with --drop-layers, which leaves {implied}",
                fix="pass only one of them",
            )
        layers = implied
    if kv_heads is not None and heads is None:
        heads = kv_heads * (teacher.heads // teacher.kv_heads)
    student = teacher.replace(
        **{
            key: value
            for key, value in dict(
                hidden=hidden, ffn=ffn, heads=heads, kv_heads=kv_heads, layers=layers, experts=experts, top_k=top_k
            ).items()
            if value is not None
        }
    )
    check_student(teacher, student)
    return student


def check_student(teacher: Shape, student: Shape) -> None:
    """Refuse a student the teacher cannot be pruned to, naming the flag and the limit."""
    for key in FIXED:
        if getattr(student, key) != getattr(teacher, key):
            raise UserError(f"pruning cannot change {key} ({getattr(teacher, key)} → {getattr(student, key)})")
    # kv_heads before heads: --kv-heads alone sets heads to kv_heads × the group size, so an out-of-range
    # --kv-heads must be reported as itself, not as the heads it implies.
    for key in ("hidden", "ffn", "layers", "kv_heads", "heads") + (("experts", "top_k") if teacher.experts else ()):
        value, limit = getattr(student, key), getattr(teacher, key)
        if value < 1:
            raise UserError(f"must be at least 1, got {value}", where=flag(key, teacher))
        if value > limit:
            raise UserError(
                f"{value} is larger than the teacher's {limit}",
                where=flag(key, teacher),
                fix="pruning only shrinks a model: pass at most the teacher's value",
            )
    if student.heads % student.kv_heads:
        raise UserError(
            f"{student.heads} query heads do not divide into {student.kv_heads} KV groups",
            where="--heads/--kv-heads",
            fix=f"pass a multiple of {student.kv_heads} (each kept KV group keeps the same number of query heads)",
        )
    per_group = teacher.heads // teacher.kv_heads
    if student.heads // student.kv_heads > per_group:
        raise UserError(
            f"{student.heads} heads in {student.kv_heads} KV groups needs {student.heads // student.kv_heads} "
            f"heads per group, but each group has {per_group}",
            where="--heads/--kv-heads",
            fix=f"pass --heads at most {per_group * student.kv_heads} or keep more KV groups",
        )
    if not FAMILIES[student.model_type].loads_width(student.hidden, student.heads):
        step = student.heads
        below, above = student.hidden // step * step, (student.hidden // step + 1) * step
        where, fix = "--hidden-size", f"pass a multiple of {step}, e.g. {below} or {above}" if below else f"pass a multiple of {step}"
        if student.hidden == teacher.hidden:
            # The teacher's hidden size: what breaks it is the head count the user asked for.
            where = "--heads" if student.kv_heads == teacher.kv_heads else "--heads/--kv-heads"
            fits = [h for h in range(student.kv_heads, student.heads, student.kv_heads) if student.hidden % h == 0]
            fix = f"pass --heads {fits[-1]}, or also --hidden-size a multiple of {step}" if fits else f"also pass --hidden-size a multiple of {step}"
        raise UserError(
            f"hidden size {student.hidden} is not a multiple of the {student.heads} query heads, which "
            f"{student.model_type} checkpoints require",
            where=where,
            fix=fix,
        )
    if teacher.experts and student.experts < student.top_k:
        raise UserError(
            f"keeping {student.experts} experts is fewer than the router's top-k {student.top_k}",
            where="--experts",
            fix=f"keep at least {student.top_k} experts, or also pass --top-k {student.experts} to route each "
            "token to fewer experts",
        )


# --- the plan ---------------------------------------------------------------------------------------------------


@dataclass
class LayerPlan:
    """What one student layer keeps of teacher layer ``source`` (all indices in teacher numbering).

    ``neurons`` is a list of MLP neurons for dense models, and one such list per kept expert (in the order of
    ``experts``) for MoE models. ``heads`` lists the kept query heads group by group (see the module doc).
    """

    source: int
    heads: list[int]
    kv_groups: list[int]
    neurons: list[int] | list[list[int]]
    experts: list[int] = field(default_factory=list)


@dataclass
class Plan:
    """Teacher and student shapes, the kept embedding channels and one :class:`LayerPlan` per kept layer."""

    teacher: Shape
    student: Shape
    hidden: list[int]
    layers: list[LayerPlan]
    scores: dict[str, Any] = field(default_factory=dict)  # digest of the scores it was made from
    # One factor per teacher norm over the embedding channels (layer by layer in the family's order, then
    # the final norm) that its weight is multiplied by; empty: none rescaled (see `norm_scales`).
    norm_scale: list[float] = field(default_factory=list)

    @property
    def dropped_layers(self) -> list[int]:
        kept = {layer.source for layer in self.layers}
        return [i for i in range(self.teacher.layers) if i not in kept]

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": PLAN_VERSION,
            "teacher": self.teacher.to_dict(),
            "student": self.student.to_dict(),
            "dropped_layers": self.dropped_layers,
            "hidden": self.hidden,
            "layers": [vars(layer) for layer in self.layers],
            "scores": self.scores,
            "norm_scale": self.norm_scale,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "plan") -> "Plan":
        try:
            if data.get("version") != PLAN_VERSION:
                raise UserError(f"plan version {data.get('version')!r} is not {PLAN_VERSION}", where=where)
            plan = cls(
                teacher=Shape(**data["teacher"]),
                student=Shape(**data["student"]),
                hidden=list(data["hidden"]),
                layers=[LayerPlan(**layer) for layer in data["layers"]],
                scores=dict(data.get("scores", {})),
                norm_scale=[float(x) for x in data.get("norm_scale", [])],
            )
        except (KeyError, TypeError, AttributeError, ValueError) as e:
            raise UserError(f"not a minitron plan ({type(e).__name__}: {e})", where=where) from None
        plan.check(where)
        return plan

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise UserError("no such file", where=str(path)) from None
        except json.JSONDecodeError as e:
            raise UserError(f"plan is not valid JSON ({e.msg}, line {e.lineno})", where=str(path)) from None
        return cls.from_dict(data, where=str(path))

    def check(self, where: str = "plan") -> None:
        """Every index list has the student's length, unique entries in the teacher's range, GQA-consistent."""
        t, s = self.teacher, self.student
        check_student(t, s)

        def indices(values: list[int], size: int, limit: int, what: str) -> None:
            if len(values) != size or len(set(values)) != size or not all(0 <= v < limit for v in values):
                raise UserError(f"{what} must be {size} distinct indices below {limit}", where=where)

        indices(self.hidden, s.hidden, t.hidden, "hidden")
        if self.norm_scale and (
            len(self.norm_scale) != norm_count(t) or not all(0 < x < math.inf for x in self.norm_scale)
        ):
            raise UserError(f"norm_scale must be {norm_count(t)} positive finite factors", where=where)
        indices([layer.source for layer in self.layers], s.layers, t.layers, "layer sources")
        per_group = t.heads // t.kv_heads
        for layer in self.layers:
            name = f"layer {layer.source}"
            indices(layer.kv_groups, s.kv_heads, t.kv_heads, f"{name} kv_groups")
            indices(layer.heads, s.heads, t.heads, f"{name} heads")
            keep = s.heads // s.kv_heads
            for k, group in enumerate(layer.kv_groups):
                if any(h // per_group != group for h in layer.heads[k * keep : (k + 1) * keep]):
                    raise UserError(f"{name}: heads are not listed group by group as kv_groups", where=where)
            if t.experts:
                indices(layer.experts, s.experts, t.experts, f"{name} experts")
                if len(layer.neurons) != s.experts:
                    raise UserError(f"{name}: one neuron list per kept expert is needed", where=where)
                for neurons in layer.neurons:
                    indices(neurons, s.ffn, t.ffn, f"{name} neurons")
            else:
                indices(layer.neurons, s.ffn, t.ffn, f"{name} neurons")


def _top(scores: torch.Tensor, k: int) -> list[int]:
    """Indices of the ``k`` largest scores, ties to the lower index, returned in increasing order."""
    order = torch.sort(scores.double(), descending=True, stable=True).indices[:k]
    return sorted(order.tolist())


class _ScoreReader:
    """Reads score tensors by contract key, checking their shape against the teacher's."""

    def __init__(self, scores: Any, teacher: Shape):
        self.tensors = None if scores is None else scores.tensors
        self.teacher = teacher

    def has(self, key: str) -> bool:
        return self.tensors is not None and key in self.tensors

    def get(self, key: str, shape: tuple[int, ...], where: str) -> torch.Tensor:
        if self.tensors is None:
            raise UserError("this shrinks the model but no importance scores were given", where=where, fix=NEED_SCORES)
        if key not in self.tensors:
            raise UserError(f"the scores have no {key!r}", where=where,
                            fix="recompute them with this version of `minitron importance`")
        value = self.tensors[key]
        if tuple(value.shape) != shape:
            raise UserError(
                f"scores {key!r} have shape {tuple(value.shape)}, this model needs {shape}: "
                "they were computed on another model",
                where="--scores",
                fix="compute scores on this teacher with `minitron importance`",
            )
        if not torch.isfinite(value).all():
            raise UserError(f"scores {key!r} contain NaN or inf", where="--scores", fix="recompute the scores")
        return value


def norm_count(teacher: Shape) -> int:
    """How many norms act over the embedding channels: each layer's, then the final one."""
    return teacher.layers * len(teacher.family.layer_norms) + 1


def norm_scales(teacher: Shape, hidden: list[int], reader: _ScoreReader) -> list[float]:
    """The factor for each RMSNorm's weight when only the ``hidden`` embedding channels remain.

    An RMSNorm divides by the root mean square of *all* its input channels. Removing channels changes that
    divisor: keeping the channels that carry the most energy (what activation importance keeps) makes the
    mean square over the kept ones larger than over all, and every normalised activation downstream smaller
    than the weights after the norm were trained for. Multiplying the norm's weight by
    ``√(mean over kept of E / mean over all of E)``, where ``E`` is each channel's mean square at the norm's
    input on the calibration tokens (scores key ``norm_energy``), gives the kept channels the scale they had
    in the teacher, on average over tokens (exactly, for channels that carry nothing). Its effect on the
    held-out loss, cut by cut, is measured in ``benchmarks/results/unit_ranking.md`` (the column *norms not
    rescaled*) and after distillation in ``benchmarks/results/peers_prune_*.md``.

    Empty when nothing is rescaled: the embedding is whole, the family's norms are not RMSNorms, or the
    scores predate ``norm_energy``.
    """
    if len(hidden) == teacher.hidden or not teacher.family.rms_norms or not reader.has("norm_energy"):
        return []
    energy = reader.get("norm_energy", (norm_count(teacher), teacher.hidden), "--hidden-size").double()
    kept, whole = energy[:, hidden].mean(1), energy.mean(1)
    scale = torch.where((kept > 0) & (whole > 0), kept / whole.clamp(min=1e-300), 1.0).sqrt()
    return [float(x) for x in scale]


def scores_digest(scores: Any) -> dict[str, Any]:
    """Which scores made a plan: the content hash of the score tensors (``Scores.digest``, the same one the
    scores file records) and the scores' metadata (model, data, settings)."""
    if scores is None:
        return {}
    meta = {key: value for key, value in (scores.meta or {}).items() if key != "digest"}
    return {"sha256": scores.digest, "meta": meta}


def _kept_layers(teacher: Shape, student: Shape, reader: _ScoreReader, drop_layers, depth_key) -> list[int]:
    if drop_layers is not None:
        dropped = sorted(set(drop_layers))
        if any(not 0 <= i < teacher.layers for i in dropped):
            raise UserError(f"layers out of range: {dropped}", where="--drop-layers",
                            fix=f"the model has layers 0-{teacher.layers - 1}")
        if teacher.layers - len(dropped) != student.layers:
            raise UserError(
                f"dropping {len(dropped)} of {teacher.layers} layers leaves {teacher.layers - len(dropped)}, "
                f"not {student.layers}",
                where="--drop-layers",
            )
        return [i for i in range(teacher.layers) if i not in dropped]
    if student.layers == teacher.layers:
        return list(range(teacher.layers))
    # The LM-loss rise is the better depth signal when it was measured (2407.14679 §2.2); fall back to 1 − cos.
    key = depth_key or ("layer_loss" if reader.has("layer_loss") else "blocks")
    return _top(reader.get(key, (teacher.layers,), "--layers"), student.layers)


def _kept_heads(teacher: Shape, student: Shape, reader: _ScoreReader, i: int) -> tuple[list[int], list[int]]:
    per_group, keep = teacher.heads // teacher.kv_heads, student.heads // student.kv_heads
    if student.kv_heads == teacher.kv_heads:
        groups = list(range(teacher.kv_heads))
    else:
        groups = _top(reader.get(f"kv_groups.{i}", (teacher.kv_heads,), "--kv-heads"), student.kv_heads)
    if keep == per_group:
        return [h for g in groups for h in range(g * per_group, (g + 1) * per_group)], groups
    head_scores = reader.get(f"heads.{i}", (teacher.heads,), "--heads")
    heads = []
    for g in groups:
        inside = _top(head_scores[g * per_group : (g + 1) * per_group], keep)
        heads += [g * per_group + h for h in inside]
    return heads, groups


def make_plan(
    teacher: Shape,
    student: Shape,
    scores: Any = None,
    drop_layers: list[int] | None = None,
    *,
    depth_key: str | None = None,
    expert_key: str = "expert_norm",
) -> Plan:
    """Keep the top-scored units of every axis that shrinks.

    Args:
        teacher, student: shapes; ``student`` is checked against ``teacher`` (:func:`check_student`).
        scores: a ``minitron.importance.Scores`` (only its ``tensors`` dict and ``meta`` are read); may be
            ``None`` when nothing shrinks that needs scores (e.g. only ``drop_layers``).
        drop_layers: explicit teacher layers to drop; otherwise the lowest ``depth_key`` layers go.
        depth_key: ``"blocks"`` (1 − cos) or ``"layer_loss"``; default: ``layer_loss`` when present.
        expert_key: ``"expert_norm"`` (output norm, which weighs how often *and* how strongly an expert
            acts) or ``"expert_tokens"`` (routed-token count).
    """
    check_student(teacher, student)
    reader = _ScoreReader(scores, teacher)
    if student.hidden == teacher.hidden:
        hidden = list(range(teacher.hidden))
    else:
        hidden = _top(reader.get("hidden", (teacher.hidden,), "--hidden-size"), student.hidden)
    layers = []
    for i in _kept_layers(teacher, student, reader, drop_layers, depth_key):
        heads, groups = _kept_heads(teacher, student, reader, i)
        if teacher.experts:
            if student.experts == teacher.experts:
                experts = list(range(teacher.experts))
            else:
                experts = _top(reader.get(f"{expert_key}.{i}", (teacher.experts,), "--experts"), student.experts)
            if student.ffn == teacher.ffn:
                neurons = [list(range(teacher.ffn)) for _ in experts]
            else:
                per_expert = reader.get(f"neurons.{i}", (teacher.experts, teacher.ffn), flag("ffn", teacher))
                neurons = [_top(per_expert[e], student.ffn) for e in experts]
        else:
            experts = []
            if student.ffn == teacher.ffn:
                neurons = list(range(teacher.ffn))
            else:
                neurons = _top(reader.get(f"neurons.{i}", (teacher.ffn,), "--ffn-size"), student.ffn)
        layers.append(LayerPlan(source=i, heads=heads, kv_groups=groups, neurons=neurons, experts=experts))
    plan = Plan(teacher, student, hidden, layers, scores_digest(scores), norm_scales(teacher, hidden, reader))
    plan.check()
    return plan


def identity_plan(shape: Shape) -> Plan:
    """The plan that keeps everything (useful as a reference: it must reproduce the teacher exactly)."""
    return make_plan(shape, shape, None)


# --- summaries for the terminal -----------------------------------------------------------------------------


def summary(model: str, teacher: Shape, student: Shape, dropped_layers: list[int] | None = None) -> dict[str, Any]:
    """Teacher and student shape and parameter counts, as the ``--dry-run --json`` output prints them."""
    return {
        "model": str(model),
        "family": teacher.model_type,
        "teacher": {"shape": teacher.to_dict(), "params": teacher.counts()},
        "student": {"shape": student.to_dict(), "params": student.counts()},
        "dropped_layers": dropped_layers,
    }


def summary_table(info: dict[str, Any]):
    """A rich table: one row per shape field and count, teacher beside student."""
    from rich.table import Table

    from minitron.report_console import human

    teacher, student = info["teacher"], info["student"]
    table = Table(title=f"{info['model']} ({info['family']}) → student", title_justify="left")
    for name, justify in (("", "left"), ("teacher", "right"), ("student", "right"), ("kept", "right")):
        table.add_column(name, justify=justify, style="bold" if not name else None)
    fields = ["hidden", "ffn", "layers", "heads", "kv_heads", "head_dim"]
    if teacher["shape"]["experts"]:
        fields += ["experts", "top_k"]
    for key in fields:
        a, b = teacher["shape"][key], student["shape"][key]
        table.add_row(key, str(a), str(b), f"{b / a:.0%}")
    counts = ["total", "embedding", "non_embedding"] + (["active"] if teacher["shape"]["experts"] else [])
    for key in counts:
        a, b = teacher["params"][key], student["params"][key]
        table.add_row(f"params {key}", f"{a:,} ({human(a)})", f"{b:,} ({human(b)})", f"{b / a:.1%}")
    if info.get("dropped_layers"):
        table.caption = f"dropped layers: {layer_ranges(info['dropped_layers'])}"
    return table


def layer_ranges(values: list[int]) -> str:
    """[16, 17, 18, 31] → '16-18,31'."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(f"{start}-{v}" if v != start else str(v))
            start = None
    return ",".join(parts)

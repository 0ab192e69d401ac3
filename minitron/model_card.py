"""The README.md model card of a minitron checkpoint: where it came from, so that it can be made again.

:func:`write` records the pruning (teacher, teacher vs student shape and parameter counts, dropped layers,
which scores chose the units, the exact command, library versions, date). Later stages append their own
section with :func:`add_distillation_section`; a card is only ever added to, never rewritten, so the
lineage reads top to bottom in the order things happened. :func:`read_lineage` reads it back (with
plan.json) for ``minitron eval``'s results and the leaderboard.
"""

from __future__ import annotations

import contextlib
import json
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from minitron.artifacts import versions
from minitron.families import Shape
from minitron.inputs import is_local
from minitron.plan import Plan, layer_ranges


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _cell(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[Any, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _shape_rows(plan: Plan) -> list[tuple[Any, ...]]:
    t, s = plan.teacher, plan.student
    fields = ["hidden", "ffn", "layers", "heads", "kv_heads", "head_dim"] + (["experts", "top_k"] if t.experts else [])
    rows = [(name, getattr(t, name), getattr(s, name)) for name in fields]
    tc, sc = t.counts(), s.counts()
    counts = ["total", "embedding", "non_embedding"] + (["active"] if t.experts else [])
    rows += [(f"params {name}", f"{tc[name]:,}", f"{sc[name]:,}") for name in counts]
    return rows


def _rescaled(plan: Plan) -> str:
    if not plan.norm_scale:
        return ""
    low, high = min(plan.norm_scale), max(plan.norm_scale)
    return (
        f" The weights of the {len(plan.norm_scale)} RMSNorms over the embedding channels were multiplied by its "
        f"`norm_scale` factors ({low:.3f}–{high:.3f}), from the calibration energy of the channels kept."
    )


def write(path: str | Path, plan: Plan, *, teacher: str, command: str | None) -> None:
    """Write the card of a freshly pruned checkpoint to ``path`` (README.md)."""
    front = {"library_name": "transformers", "tags": ["minitron", "pruned", plan.teacher.model_type]}
    if not is_local(teacher):
        front["base_model"] = teacher
    dropped = plan.dropped_layers
    scores = plan.scores or {}
    parts = [
        "---\n" + yaml.safe_dump(front, sort_keys=False) + "---",
        f"# Pruned from {Path(teacher).name if is_local(teacher) else teacher}",
        "A structurally pruned checkpoint made with minitron (the Minitron recipe, arXiv 2407.14679): "
        "importance-ranked units of the teacher were removed. It has not been distilled yet unless a "
        "Distillation section follows; expect its quality to need distillation to recover.",
        "## Pruning",
        _table(
            [
                ("teacher", teacher),
                ("date", _now()),
                ("command", f"`{command}`" if command else "(called from Python)"),
                ("dropped layers (teacher numbering)", layer_ranges(dropped) if dropped else "none"),
            ],
            ("", ""),
        ),
        _table(_shape_rows(plan), ("", "teacher", "student")),
        "The kept indices of every axis and layer are in `plan.json` beside this card." + _rescaled(plan),
        "## Importance scores",
        (
            _table([("sha256 of the score tensors", scores["sha256"])] + sorted(scores.get("meta", {}).items()), ("", ""))
            if scores
            else "None: nothing was removed that needed ranking (explicit layer drops only)."
        ),
        "## Versions",
        _table(sorted(versions().items()), ("library", "version")),
    ]
    Path(path).write_text("\n\n".join(parts) + "\n")


def add_distillation_section(card_path: str | Path, facts: dict[str, Any]) -> None:
    """Append a "Distillation" section (a two-column table of ``facts``, plus the date) to a model card.

    ``facts`` holds whatever the distillation wants on record: teacher, recipe, tokens, steps, final loss,
    the command. Values that are not strings are written as JSON. A missing card is started with a title.
    """
    path = Path(card_path)
    text = path.read_text() if path.is_file() else f"# {path.parent.name}\n"
    section = "## Distillation\n\n" + _table([("date", _now())] + list(facts.items()), ("", ""))
    path.write_text(text.rstrip("\n") + "\n\n" + section + "\n")


# --- reading it back ------------------------------------------------------------------------------------------------


def _front_matter(text: str) -> dict[str, Any]:
    match = re.match(r"\A---\n(.*?)\n---\n", text, re.S)
    if not match:
        return {}
    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError:
        return {}
    return data if isinstance(data, dict) else {}


def _section_table(text: str, title: str) -> dict[str, str]:
    """The two-column ``| key | value |`` rows of one ``## title`` section of a model card."""
    match = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    rows: dict[str, str] = {}
    for line in (match.group(1) if match else "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 2 and cells[0] and not set(cells[0]) <= set("-: "):
            rows.setdefault(cells[0], cells[1].strip("`"))
    return rows


def read_lineage(model: str | Path) -> dict[str, Any]:
    """Where a checkpoint came from, as far as its model card (README.md) and plan.json say.

    ``pruned_from`` is the teacher row of the card's "Pruning" section, ``distilled_from`` that of its
    "Distillation" section, ``base_model`` the card's front matter; ``teacher`` is the first of
    distilled_from, pruned_from, base_model. plan.json adds the teacher's parameter count and dropped layers.
    """
    folder = Path(model)
    facts: dict[str, Any] = {}
    card = folder / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        base = _front_matter(text).get("base_model")
        if isinstance(base, list):
            base = base[0] if base else None
        for key, value in (
            ("distilled_from", _section_table(text, "Distillation").get("teacher")),
            ("pruned_from", _section_table(text, "Pruning").get("teacher")),
            ("base_model", base),
        ):
            if value:
                facts[key] = str(value)
        facts["card"] = "README.md"
    plan = folder / "plan.json"
    if plan.is_file():
        with contextlib.suppress(ValueError, TypeError, KeyError):
            data = json.loads(plan.read_text())
            facts["teacher_params"] = Shape(**data["teacher"]).counts()["total"]
            facts["dropped_layers"] = list(data.get("dropped_layers", []))
    teacher = facts.get("distilled_from") or facts.get("pruned_from") or facts.get("base_model")
    if teacher:
        facts["teacher"] = teacher
    return facts

"""Rich renderings shared by the CLI verbs (terminal tables, progress bars), and the search's candidate tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

if TYPE_CHECKING:
    from minitron.families import Shape


def human(n: float) -> str:
    """4512746496 → '4.51B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def percent(x: float) -> str:
    """0.0625 → '6.25%', 0.125 → '12.5%', 0.02 → '2%'."""
    return f"{x * 100:.2f}".rstrip("0").rstrip(".") + "%"


def shape_table(info: dict) -> Table:
    shape, params = info["shape"], info["params"]
    table = Table(title=f"{info['model']} ({info['family']})", show_header=False, title_justify="left")
    table.add_column(style="bold")
    table.add_column(justify="right")
    rows = [
        ("hidden", shape["hidden"]),
        ("ffn" + (" (per expert)" if shape["experts"] else ""), shape["ffn"]),
        ("layers", shape["layers"]),
        ("heads", shape["heads"]),
        ("kv heads", shape["kv_heads"]),
        ("head_dim", shape["head_dim"]),
        ("vocab", shape["vocab"]),
        ("tied embeddings", "yes" if shape["tied"] else "no"),
    ]
    if shape["experts"]:
        rows += [("experts", shape["experts"]), ("top-k", shape["top_k"])]
    rows += [
        ("params total", f"{params['total']:,} ({human(params['total'])})"),
        ("params embedding", f"{params['embedding']:,}"),
        ("params non-embedding", f"{params['non_embedding']:,}"),
    ]
    if shape["experts"]:
        rows.append(("params active / token", f"{params['active']:,} ({human(params['active'])})"))
    for key, value in rows:
        table.add_row(key, str(value))
    return table


def progress(*extra_columns, transient: bool = False) -> Progress:
    """The one progress-bar layout of minitron; stages add their own columns (tokens/s, loss...)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        *extra_columns,
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        transient=transient,
    )


# --- the architecture search (`minitron prune --target`) -----------------------------------------------------


def budget_text(budget: dict[str, Any]) -> str:
    """A budget record (``Budget.to_dict``) → '8.00B params ±6.25% (the precision of 8B)'."""
    parts = [f"{human(budget['total'])} params"] if budget["total"] else []
    parts += [f"{human(budget['active'])} active"] if budget["active"] else []
    why = f" ({budget['tolerance_why']})" if budget.get("tolerance_why") else ""
    return f"{' and '.join(parts)} ±{percent(budget['tolerance'])}{why}"


def candidates_table(rows: Sequence[dict[str, Any]], teacher: Shape, title: str, limit: int | None = 20):
    """A rich table of candidate records (from ``search_grid.Candidate.to_dict`` / ``search.Ranked.to_dict``)."""
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


def search_tables(info: dict[str, Any], teacher: Shape) -> list[Any]:
    """The rich renderables the CLI prints for a dry run (the candidates) or a search (ranking + summary)."""
    from minitron.plan import summary_table

    if "search" not in info:
        title = f"{info['count']} candidates for {budget_text(info['budget'])} ({', '.join(info['axes'])})"
        return [candidates_table(info["candidates"], teacher, title)]
    record = info["search"]
    ranked = sorted((c for c in record["candidates"] if "rank" in c), key=lambda c: c["rank"])
    how = record["ranking"]
    steps = f", after {how['search_steps']} distillation steps" if how["search_steps"] else ""
    title = f"top {len(ranked)} of {len(record['candidates'])} candidates by held-out {how['rank_by']}{steps}"
    return [candidates_table(ranked, teacher, title, limit=None), summary_table(info)]

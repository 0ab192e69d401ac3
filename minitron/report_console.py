"""Rich renderings shared by the CLI verbs (terminal tables, progress bars)."""

from __future__ import annotations

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


def human(n: float) -> str:
    """4512746496 → '4.51B'."""
    for unit, size in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


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

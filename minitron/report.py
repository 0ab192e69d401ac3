"""``minitron report``: a leaderboard of students beside their teachers, and beside published numbers.

Reads the results files of ``minitron eval`` (lm-eval's JSON plus a ``minitron`` section), links each
student to its teacher through the lineage recorded there, and writes one folder:

- ``leaderboard.md``: the tables, with the plots linked from ``plots/``;
- ``leaderboard.html``: one self-contained page (inline CSS, plots inlined as SVG, no network at view time);
- ``plots/*.svg``: accuracy against parameters and per-task bars (error bars ± 2 standard errors, a dashed
  line at chance), perplexities (lower is better), retained accuracy of each student (%).

Small models score at chance on the accuracy benchmarks, where one more right answer in 20 moves a ratio by
ten points: every accuracy carries lm-eval's standard error and its number of documents, a score within two
standard errors of its task's chance level is marked, and retained accuracy is only computed from scores
that are not. The greedy continuations ``minitron eval`` records are shown side by side.

Published rows come from ``eval/references.yaml`` and are always labelled as published, never measured.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from minitron.errors import UserError
from minitron.evaluate import CHANCE, FORMAT_VERSION, TASKS, TOOL, eval_dir
from minitron.report_check import check_section
from minitron.report_console import human

# The accuracy columns of the leaderboard (percent, higher is better), then the other headline numbers.
ACCURACY = ("MMLU", "HellaSwag", "GSM8K")
COLUMNS = ACCURACY + ("GSM8K flexible", "WikiText word ppl", "WikiText byte ppl")
PERPLEXITY = ("WikiText word ppl", "WikiText byte ppl")
SHOTS_OF = {h.label: task for task, (_, headlines) in TASKS.items() for h in headlines}


# --- inputs -------------------------------------------------------------------------------------------------


@dataclass
class Row:
    """One model on the leaderboard: measured by us, or published."""

    name: str
    params: float
    scores: dict[str, float]  # label → percent (accuracies) or plain value (perplexities)
    shots: dict[str, int]
    published: bool
    active_params: float | None = None
    teacher: Row | None = None  # its teacher's row, once linked
    teacher_ref: str | None = None  # what its lineage says the teacher is (path, hub id or name)
    role: str = "model"
    source: str = ""
    notes: list[str] = field(default_factory=list)
    raw: dict[str, float] = field(default_factory=dict)  # label → the number exactly as in the JSON
    run: dict[str, Any] = field(default_factory=dict)  # settings / timing / lineage of a measured row
    keys: set[str] = field(default_factory=set)  # names that lineage may use for this model
    stderr: dict[str, float] = field(default_factory=dict)  # label → lm-eval's standard error, in the unit of scores
    samples: dict[str, int] = field(default_factory=dict)  # label → number of documents scored
    generations: list[dict[str, str]] = field(default_factory=list)  # greedy continuations of the eval prompts


class _Score(BaseModel):
    model_config = ConfigDict(extra="forbid")
    value: float
    shots: int
    metric: str | None = None


class _Reference(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    hub_id: str
    kind: Literal["base", "instruct"]
    params: float
    active_params: float | None = None
    teacher: str | None = None
    source: str
    note: str | None = None
    scores: dict[Literal["MMLU", "HellaSwag", "GSM8K"], _Score]


class _References(BaseModel):
    model_config = ConfigDict(extra="forbid")
    format_version: Literal[1]
    references: list[_Reference]


def load_references(path: str | Path | None = None) -> list[Row]:
    """The published rows of ``eval/references.yaml`` (schema-checked: a typo is an error, not a default)."""
    import yaml

    from minitron.inputs import read_text

    path = Path(path) if path else eval_dir() / "references.yaml"
    try:
        data = _References.model_validate(yaml.safe_load(read_text(path)))
    except ValidationError as e:
        first = e.errors()[0]
        raise UserError(f"{'.'.join(map(str, first['loc']))}: {first['msg']}", where=str(path)) from None
    rows = []
    for ref in data.references:
        notes = [f"{ref.kind} model"] + ([ref.note] if ref.note else [])
        rows.append(
            Row(
                name=ref.name,
                params=ref.params,
                active_params=ref.active_params,
                scores={k: s.value for k, s in ref.scores.items()},
                raw={k: s.value for k, s in ref.scores.items()},
                shots={k: s.shots for k, s in ref.scores.items()},
                published=True,
                teacher_ref=ref.teacher,
                source=ref.source,
                notes=notes,
                keys={ref.name, ref.hub_id},
            )
        )
    return rows


def load_results(path: str | Path) -> Row:
    """One results file of ``minitron eval``; anything else is a one-line :class:`UserError`."""
    from minitron.inputs import check_format_version, read_json

    path = Path(path)
    data = read_json(path)
    section = data.get(TOOL) if isinstance(data, dict) else None
    if not isinstance(section, dict) or section.get("tool") != TOOL:
        tool = "lm-eval" if isinstance(data, dict) and "lm_eval_version" in data else "an unknown tool"
        raise UserError(
            f"not a minitron results file (written by {tool}, no 'minitron' section)",
            where=str(path),
            fix="evaluate the model with `minitron eval MODEL -o FILE`",
        )
    check_format_version(
        section.get("format_version"), FORMAT_VERSION, kind="results", where=str(path),
        fix="re-run `minitron eval` with this version, or use the minitron that wrote the file",
    )  # fmt: skip
    check_section(section, path)
    try:
        model, settings, summary = section["model"], section["settings"], section["summary"]
        row = Row(
            name=model["name"],
            params=float(model["params"]["total"]),
            active_params=float(model["params"]["active"]) if model["shape"].get("experts") else None,
            scores={k: v["value"] * (100 if v["higher_is_better"] else 1) for k, v in summary.items()},
            raw={k: v["value"] for k, v in summary.items()},
            shots={label: settings["shots"][v["task"]] for label, v in summary.items()},
            published=False,
            teacher_ref=section.get("lineage", {}).get("teacher"),
            source=str(path),
            run={**section, "file": str(path)},
            keys={model["name"], model["path"]},
            stderr={k: v["stderr"] * (100 if v["higher_is_better"] else 1) for k, v in summary.items()
                    if isinstance(v.get("stderr"), (int, float))},
            samples={k: int(v["samples"]) for k, v in summary.items() if isinstance(v.get("samples"), int)},
            generations=list((section.get("generations") or {}).get("samples", [])),
        )
    except (KeyError, TypeError, AttributeError) as e:
        raise UserError(f"malformed minitron section ({type(e).__name__}: {e})", where=str(path),
                        fix="re-run `minitron eval` to write the file again") from None
    if settings.get("limit"):
        row.notes.append(f"--limit {settings['limit']}: quick check, not comparable")
    for task, what in settings.get("partial", {}).items():
        row.notes.append(f"{task}: {what}")
    if str(settings.get("data", "")).startswith("local"):
        row.notes.append("local data")
    return row


# --- lineage ------------------------------------------------------------------------------------------------


def _matches(reference: str, row: Row) -> bool:
    ref = reference.rstrip("/")
    return ref in row.keys or Path(ref).name in {Path(k.rstrip("/")).name for k in row.keys}


def link(rows: list[Row]) -> None:
    """Give each row whose lineage names a teacher on the board the teacher's name, and roles to both.

    Measured students link to measured teachers, published students to published teachers: a published
    number is never the baseline of a measured one.
    """
    for row in rows:
        if not row.teacher_ref:
            continue
        candidates = [t for t in rows if t is not row and t.published == row.published and _matches(row.teacher_ref, t)]
        row.role = "student"
        if candidates:
            row.teacher = candidates[0]
            if candidates[0].role == "model":
                candidates[0].role = "teacher"
        else:
            row.notes.append(f"teacher {row.teacher_ref} not on the board")
    names: dict[str, int] = {}
    for row in rows:  # two runs of models with the same folder name: tell them apart
        names[row.name] = names.get(row.name, 0) + 1
        if names[row.name] > 1:
            row.name = f"{row.name} ({names[row.name]})"


def at_chance(row: Row, label: str) -> bool:
    """Whether a score is within two standard errors of its task's chance level (no error known: not judged).

    The yardstick is the larger of lm-eval's standard error and that of a guesser on the same number of
    documents (binomial at the chance rate): lm-eval's is 0 for a score of 0 or 100 %, which would make 0 of 6
    MMLU questions "not chance". GSM8K's chance is 0, so there it is lm-eval's error alone."""
    if label not in CHANCE or label not in row.scores:
        return False
    chance = CHANCE[label] / 100
    guess = 100 * math.sqrt(chance * (1 - chance) / row.samples[label]) if row.samples.get(label) else None
    errors = [e for e in (row.stderr.get(label), guess) if e is not None]
    return bool(errors) and abs(row.scores[label] - CHANCE[label]) <= 2 * max(errors)


def retained(student: Row, teacher: Row) -> dict[str, float]:
    """Student accuracy as a percentage of the teacher's, for each accuracy both have (teacher > 0), except
    where either score is indistinguishable from chance: a ratio of two guesses says nothing."""
    return {
        label: 100.0 * student.scores[label] / teacher.scores[label]
        for label in ACCURACY
        if label in student.scores and teacher.scores.get(label)
        and not at_chance(student, label) and not at_chance(teacher, label)
    }


# --- tables -------------------------------------------------------------------------------------------------


def _cell(row: Row, label: str) -> str:
    """A score as shown: 2 decimals ± its standard error, with its shots when they are not the task's standard
    (HellaSwag: always) and its number of documents."""
    value = row.scores[label]
    text = f"{value:.2f}" if math.isfinite(value) else str(value)
    if label in row.stderr:
        text += f" ± {row.stderr[label]:.2f}"
    standard = TASKS[SHOTS_OF[label]][0]
    if label == "HellaSwag" or row.shots.get(label, standard) != standard:
        text += f" ({row.shots[label]}-shot)"
    if label in row.samples:
        text += f" n={row.samples[label]}"
    return text


CHANCE_NOTE = (
    "± is lm-eval's standard error, n the number of documents. ≈ chance: within two standard errors of the "
    f"task's chance level ({', '.join(f'{k} {v:g} %' for k, v in CHANCE.items())}); retained accuracy is not "
    "computed from such scores."
)


def _retained_cell(student: Row, teacher: Row, kept: dict[str, float], label: str) -> str:
    if label in kept:
        return f"{kept[label]:.1f}%"
    if label in student.scores and label in teacher.scores and (at_chance(student, label) or at_chance(teacher, label)):
        return "≈ chance"
    return "–"


def _params(row: Row) -> str:
    text = human(row.params)
    return f"{text} ({human(row.active_params)} active)" if row.active_params else text


def _continuations(row: Row) -> dict[str, str]:
    return {g["prompt"]: g["continuation"] for g in row.generations if "prompt" in g and "continuation" in g}


def _generations(rows: list[Row]) -> tuple[list[str], list[Row]]:
    """The prompts any model continued (in first-seen order) and the models that continued any."""
    models = [r for r in rows if _continuations(r)]
    prompts = list(dict.fromkeys(p for r in models for p in _continuations(r)))
    return prompts, models


def _md_text(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|").replace("<", "&lt;") or " "


def _md_row(cells: list[str]) -> str:
    """One table row: a newline or ``|`` in a cell (a model's name is the user's) would end or split the row."""
    return "| " + " | ".join(_md_text(c) for c in cells) + " |"


def _teacher_name(row: Row) -> str:
    return row.teacher.name if row.teacher else ""


def markdown(measured: list[Row], published: list[Row], pairs, plots: dict[str, str]) -> str:
    lines = ["# minitron leaderboard", "", f"Generated {_now()} by minitron.", ""]
    header = ["model", "role", "params", *COLUMNS, "teacher", "notes"]
    lines += ["## Measured", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in measured:
        cells = [row.name, row.role, _params(row),
                 *((_cell(row, c) + (" **≈ chance**" if at_chance(row, c) else "")) if c in row.scores else "–" for c in COLUMNS),
                 _teacher_name(row), "; ".join(row.notes)]
        lines.append(_md_row(cells))
    lines += ["", "Accuracies in %, perplexity as is (lower is better). MMLU 5-shot, GSM8K 5-shot (strict and flexible "
              "answer match); HellaSwag shots as marked. " + CHANCE_NOTE, ""]
    if pairs:
        lines += ["## Retained accuracy (student as % of its teacher)", "", "| student | teacher | " + " | ".join(ACCURACY) + " |",
                  "|---|---|" + "---|" * len(ACCURACY)]
        for student, teacher, kept in pairs:
            cells = [_retained_cell(student, teacher, kept, label) for label in ACCURACY]
            tag = " (published)" if student.published else ""
            lines.append(_md_row([student.name + tag, teacher.name, *cells]))
        lines.append("")
    if published:
        header = ["model", "params", *ACCURACY, "teacher", "source", "notes"]
        lines += ["## Published (not measured here)", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in published:
            cells = [row.name, _params(row), *(f"{row.scores[c]:.2f} ({row.shots[c]}-shot)" if c in row.scores else "–" for c in ACCURACY),
                     _teacher_name(row), row.source, "; ".join(row.notes)]
            lines.append(_md_row(cells))
        lines.append("")
    if plots:
        lines += ["## Plots", ""] + [f"![{title}](plots/{name}.svg)" for name, title in plots.items()] + [""]
    prompts, models = _generations(measured)
    if prompts:
        lines += ["## Generated text", "", "Each model's greedy continuation of the same prompts.", "",
                  _md_row(["prompt", *(r.name for r in models)]), "|---|" + "---|" * len(models)]
        for prompt in prompts:
            cells = [prompt] + [by.get(prompt, "–") for by in (_continuations(r) for r in models)]
            lines.append(_md_row(cells))
        lines.append("")
    lines += ["## Runs", ""]
    for row in measured:
        s, t = row.run["settings"], row.run["timing"]
        lines.append(f"- **{_md_text(row.name)}**: `{row.run['model']['path']}`, {s['data']} data, tasks {', '.join(s['tasks'])}, "
                     f"limit {s.get('limit') or 'none'}, batch {s['batch_size']}, {s['device']} {s['dtype']}, "
                     f"{t['eval_s']:.0f} s; results `{row.run['file']}`")
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#222;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
table{border-collapse:collapse;font-size:.85rem;margin:.5rem 0}
th,td{border:1px solid #ddd;padding:.3rem .5rem;text-align:right;vertical-align:top}
td[data-value]{white-space:nowrap}
th{background:#f3f5f8}td.name,th.name,td.text{text-align:left}
tr.teacher td.name{font-weight:600}tr.published td{color:#666;font-style:italic}
.tag{display:inline-block;font-size:.7rem;padding:0 .35rem;border-radius:.6rem;margin-left:.3rem;font-style:normal}
.tag.teacher{background:#dce6f6;color:#1f4e9a}.tag.student{background:#fbe3d8;color:#a23d12}
.tag.model{background:#e0f0e0;color:#2d6b2d}.tag.published{background:#eee;color:#555}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{font-size:.8rem;color:#555}
.note{font-size:.8rem;color:#555}
.tag.chance{background:#f6dddd;color:#8a2222}.n{display:block;font-size:.7rem;color:#777}
details{margin:1rem 0}summary{cursor:pointer;font-weight:600}
table.gen td{text-align:left;max-width:30rem;font-family:ui-monospace,monospace;font-size:.78rem;white-space:pre-wrap}
"""


def _td(row: Row, label: str) -> str:
    if label not in row.scores:
        return "<td>–</td>"
    text, _, n = _cell(row, label).partition(" n=")
    chance = at_chance(row, label)
    # The score on the first line; documents and the chance mark on a second, small one, so the table fits.
    return (f'<td data-label="{html.escape(label)}" data-value="{row.raw[label]!r}" data-chance="{str(chance).lower()}">'
            f"{html.escape(text)}" + (f'<span class="n">n={html.escape(n)}{_tag("chance", "≈ chance") if chance else ""}</span>'
                                      if n or chance else "") + "</td>")


def _tag(kind: str, text: str | None = None) -> str:
    return f'<span class="tag {kind}">{text or kind}</span>'


def html_page(measured: list[Row], published: list[Row], pairs, plots: dict[str, tuple[str, str]]) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>minitron leaderboard</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>minitron leaderboard</h1>",
        f'<p class="note">Generated {e(_now())}. Measured rows were evaluated with <code>minitron eval</code> '
        "(lm-eval); published rows are quoted from their sources and were not measured here.</p>",
        "<h2>Measured</h2>",
        '<table id="measured"><thead><tr><th class="name">model</th><th>params</th>'
        + "".join(f"<th>{e(c)}</th>" for c in COLUMNS)
        + '<th class="name">teacher</th><th class="name">notes</th></tr></thead><tbody>',
    ]
    for row in measured:
        parts.append(
            f'<tr class="{row.role}" data-model="{e(row.name)}"><td class="name">{e(row.name)}{_tag(row.role)}</td>'
            f"<td>{e(_params(row))}</td>" + "".join(_td(row, c) for c in COLUMNS)
            + f'<td class="text">{e(_teacher_name(row))}</td><td class="text">{e("; ".join(row.notes))}</td></tr>'
        )
    parts.append("</tbody></table>")
    parts.append('<p class="note">Accuracies in %, perplexity as is (lower is better). MMLU 5-shot, GSM8K 5-shot '
                 f"(strict / flexible answer match); HellaSwag acc_norm with its shots marked. {e(CHANCE_NOTE)}</p>")
    if pairs:
        parts.append('<h2>Retained accuracy</h2><table id="retained"><thead><tr><th class="name">student</th>'
                     '<th class="name">teacher</th>' + "".join(f"<th>{c}</th>" for c in ACCURACY) + "</tr></thead><tbody>")
        for student, teacher, kept in pairs:
            cls = "published" if student.published else "student"
            cells = "".join(f'<td data-label="{c}" data-value="{kept[c]!r}">{kept[c]:.1f}%</td>' if c in kept
                            else f"<td>{e(_retained_cell(student, teacher, kept, c))}</td>" for c in ACCURACY)
            tag = _tag("published") if student.published else ""
            parts.append(f'<tr class="{cls}"><td class="name">{e(student.name)}{tag}</td>'
                         f'<td class="name">{e(teacher.name)}</td>{cells}</tr>')
        parts.append("</tbody></table>")
    if published:
        parts.append('<h2>Published <span class="note">(not measured here)</span></h2><table id="published"><thead><tr>'
                     '<th class="name">model</th><th>params</th>' + "".join(f"<th>{c}</th>" for c in ACCURACY)
                     + '<th class="name">teacher</th><th class="name">source</th><th class="name">notes</th></tr></thead><tbody>')
        for row in published:
            cells = "".join(
                f'<td data-label="{c}" data-value="{row.raw[c]!r}">{row.scores[c]:.2f} ({row.shots[c]}-shot)</td>'
                if c in row.scores else "<td>–</td>" for c in ACCURACY
            )
            parts.append(f'<tr class="published" data-model="{e(row.name)}"><td class="name">{e(row.name)}{_tag("published")}</td>'
                         f"<td>{e(_params(row))}</td>{cells}<td class=\"text\">{e(_teacher_name(row))}</td>"
                         f'<td class="text">{e(row.source)}</td><td class="text">{e("; ".join(row.notes))}</td></tr>')
        parts.append("</tbody></table>")
    if plots:
        parts.append("<h2>Plots</h2>")
        for name, (title, svg) in plots.items():
            parts.append(f'<figure id="plot-{name}">{svg}<figcaption>{e(title)}</figcaption></figure>')
    prompts, models = _generations(measured)
    if prompts:
        parts.append('<h2>Generated text</h2><details id="generations"><summary>Each model\'s greedy continuation of '
                     f"the same {len(prompts)} prompts</summary>")
        parts.append('<table class="gen"><thead><tr><th class="name">prompt</th>'
                     + "".join(f'<th class="name">{e(r.name)}</th>' for r in models) + "</tr></thead><tbody>")
        continuations = [_continuations(r) for r in models]
        for prompt in prompts:
            parts.append(f"<tr><td>{e(prompt)}</td>" + "".join(f"<td>{e(by.get(prompt, '–'))}</td>" for by in continuations)
                         + "</tr>")
        parts.append("</tbody></table></details>")
    parts.append('<h2>Runs</h2><ul class="note">')
    for row in measured:
        s, t, m = row.run["settings"], row.run["timing"], row.run["model"]
        lineage = row.run.get("lineage") or {}
        origin = ", ".join(f"{k.replace('_', ' ')} {v}" for k, v in lineage.items() if k in ("pruned_from", "distilled_from", "base_model"))
        parts.append(
            f"<li><b>{e(row.name)}</b>: <code>{e(m['path'])}</code> ({e(m['family'])}); {e(s['data'])} data; "
            f"tasks {e(', '.join(s['tasks']))}; limit {e(str(s.get('limit') or 'none'))}; batch {e(str(s['batch_size']))}; "
            f"{e(s['device'])} {e(s['dtype'])}; {t['eval_s']:.0f} s"
            + (f"; {e(origin)}" if origin else "") + f"; results <code>{e(row.run['file'])}</code></li>"
        )
    parts.append("</ul></body></html>")
    return "\n".join(parts) + "\n"


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


# --- the verb -----------------------------------------------------------------------------------------------


def write_report(results: list[str | Path], out: str | Path, *, references: bool = True, overwrite: bool = False) -> Path:
    """Read ``results``, write ``out/leaderboard.md``, ``out/leaderboard.html`` and ``out/plots/``."""
    from minitron.artifacts import atomic_dir, check_output_dir
    from minitron.report_console import progress
    from minitron.report_plots import plot_accuracy_vs_params, plot_perplexity, plot_retained, plot_task_bars

    out = check_output_dir(out, overwrite, inputs=[("the results file", r) for r in results])
    if not results:
        raise UserError("no results files given", fix="pass one or more files written by `minitron eval`")
    measured = [load_results(p) for p in results]
    published = load_references() if references else []
    link(measured)
    link(published)
    pairs = [(r, r.teacher, retained(r, r.teacher)) for r in measured + published if r.teacher]
    # A pair stays in the table when it shares an accuracy, even if every score is at chance (marked so there).
    pairs = [p for p in pairs if any(label in p[0].scores and label in p[1].scores for label in ACCURACY)]
    everything = measured + published
    figures = (
        ("accuracy_vs_params", "Accuracy against parameters: filled = measured, hollow = published; lines join students "
         "to teachers; error bars ± 2 standard errors; dashed: chance", lambda: plot_accuracy_vs_params(everything)),
        ("task_bars", "Accuracy per task (hatched = published); error bars ± 2 standard errors; dashed: chance",
         lambda: plot_task_bars(everything)),
        ("perplexity", "Perplexity of each measured model (lower is better, log scale)", lambda: plot_perplexity(measured)),
        ("retained", "Each student's accuracy as a percentage of its teacher's, where neither is at chance "
         "(hatched = published)", lambda: plot_retained([p for p in pairs if p[2]])),
    )  # fmt: skip
    plots: dict[str, tuple[str, str]] = {}
    with progress(transient=True) as bar:
        task = bar.add_task("plots", total=len(figures))
        for name, title, draw in figures:
            svg = draw()
            if svg:
                plots[name] = (title, svg)
            bar.advance(task)
    import matplotlib.pyplot as plt

    plt.close("all")
    with atomic_dir(out, overwrite=overwrite) as tmp:
        (tmp / "plots").mkdir()
        for name, (_, svg) in plots.items():
            (tmp / "plots" / f"{name}.svg").write_text(svg, encoding="utf-8")
        (tmp / "leaderboard.md").write_text(
            markdown(measured, published, pairs, {n: t for n, (t, _) in plots.items()}), encoding="utf-8"
        )
        (tmp / "leaderboard.html").write_text(html_page(measured, published, pairs, plots), encoding="utf-8")
    return out

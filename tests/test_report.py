"""`minitron report`: students linked to teachers, published rows kept apart, a self-contained HTML page whose
numbers (checked in a real headless Chromium) are those of the results files."""

import itertools
import json
import math
import re
import shutil
import subprocess
from html import escape as html_escape
from html.parser import HTMLParser
from pathlib import Path

import pytest

from minitron.errors import UserError
from minitron.evaluate import evaluate
from minitron.evaluate import CHANCE, PROMPTS
from minitron.report import ACCURACY, Row, at_chance, load_references, load_results, retained, write_report
from clirun import minitron_in_process
from test_evaluate import SAMPLES, assert_user_error, run, save_checkpoint

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


def card(teacher: Path) -> str:
    return f"---\ntags:\n- minitron\n---\n\n# Pruned\n\n## Pruning\n\n|  |  |\n|---|---|\n| teacher | {teacher} |\n"


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Real `minitron eval` results of a tiny teacher and a student whose model card names it."""
    root = tmp_path_factory.mktemp("report")
    teacher = save_checkpoint(root / "tiny-teacher", seed=1)
    student = save_checkpoint(root / "tiny-student", seed=2, card=card(teacher))
    files = []
    for model in (teacher, student):
        out = root / f"{model.name}.json"
        evaluate(model, out, tasks="mmlu,hellaswag,gsm8k,wikitext", limit=3, batch_size=8, data_dir=SAMPLES)
        files.append(out)
    return files


def test_roles_lineage_and_retained(results, tmp_path):
    teacher, student = (load_results(f) for f in results)
    out = write_report(results, tmp_path / "board")
    md = (out / "leaderboard.md").read_text()
    assert "| tiny-teacher | teacher |" in md and "| tiny-student | student |" in md
    plots = sorted(p.name for p in (out / "plots").iterdir())
    assert plots == ["accuracy_vs_params.svg", "perplexity.svg", "retained.svg", "task_bars.svg"]
    # Two random tiny models on a few questions score at chance: only the published pairs have a retained accuracy.
    assert "tiny-student" not in (out / "plots" / "retained.svg").read_text()
    # Every measured number appears as the Markdown shows it, with its standard error and documents.
    for row in (teacher, student):
        for label, value in row.scores.items():
            cell = f"{value:.2f}" + (f" ± {row.stderr[label]:.2f}" if label in row.stderr else "")
            assert cell in md, label
            assert f"n={row.samples[label]}" in md
        assert row.stderr.keys() >= {"MMLU", "HellaSwag", "GSM8K"} and row.samples["MMLU"] == 9  # 3 subjects × 3
    retained_row = next(line for line in md.splitlines() if line.startswith("| tiny-student | tiny-teacher |"))
    assert retained_row.count("≈ chance") == sum(l in student.scores for l in ACCURACY) and "%" not in retained_row
    assert "## Published (not measured here)" in md and "| Llama-3.1-Minitron-4B-Width | 4.51B | 60.50 (5-shot) |" in md


def _row(name, scores, stderr, samples=20):
    samples = samples if isinstance(samples, dict) else {k: samples for k in scores}
    return Row(name=name, params=1e7, scores=scores, shots={k: 5 for k in scores}, published=False, stderr=stderr,
               samples=samples)


def test_chance_level_scores_are_marked_and_give_no_retained_accuracy():
    # The quickstart's case: 17.5 vs 21.25 % on 20 MMLU questions (standard errors ~8.7 and ~9.4).
    n = {"MMLU": 20, "HellaSwag": 400}
    teacher = _row("teacher", {"MMLU": 21.25, "HellaSwag": 45.0}, {"MMLU": 9.4, "HellaSwag": 2.5}, n)
    student = _row("student", {"MMLU": 17.5, "HellaSwag": 40.0}, {"MMLU": 8.7, "HellaSwag": 2.5}, n)
    assert at_chance(teacher, "MMLU") and at_chance(student, "MMLU")
    assert not at_chance(teacher, "HellaSwag") and not at_chance(student, "HellaSwag")  # 40 - 25 > 2 × 2.5
    assert retained(student, teacher) == pytest.approx({"HellaSwag": 100 * 40 / 45})
    # Exactly two standard errors away is still chance; a hair beyond is not.
    edge = _row("edge", {"HellaSwag": 33.0, "GSM8K": 0.0}, {"HellaSwag": 4.0, "GSM8K": 0.0}, samples=1000)
    assert at_chance(edge, "HellaSwag") and at_chance(edge, "GSM8K")
    edge.scores["HellaSwag"] = 33.01
    assert not at_chance(edge, "HellaSwag")
    # lm-eval's error of 0 of 6 right is 0, a guesser's on 6 questions is 17.7 points: 0 % is chance there.
    assert at_chance(_row("none right", {"MMLU": 0.0}, {"MMLU": 0.0}, samples=6), "MMLU")
    assert not at_chance(_row("none right", {"MMLU": 0.0}, {"MMLU": 0.0}, samples=200), "MMLU")
    # A score with neither a standard error nor a number of documents (a published number) is not judged.
    assert not at_chance(Row(name="published", params=1.0, scores={"MMLU": 25.0}, shots={}, published=True), "MMLU")
    assert set(CHANCE) >= set(ACCURACY)


def test_generations_side_by_side_and_perplexity_plot(results, tmp_path):
    out = write_report(results, tmp_path / "board")
    rows = [load_results(f) for f in results]
    assert all([g["prompt"] for g in r.generations] == list(PROMPTS) for r in rows)
    md = (out / "leaderboard.md").read_text()
    assert "## Generated text" in md and "| prompt | tiny-teacher | tiny-student |" in md
    for prompt in PROMPTS:
        assert sum(line.startswith(f"| {prompt} |") for line in md.splitlines()) == 1
    page = (out / "leaderboard.html").read_text()
    details = page[page.index('<details id="generations">') : page.index("</details>")]
    for row in rows:
        for g in row.generations:
            assert html_escape(g["continuation"]) in details
    svg = (out / "plots" / "perplexity.svg").read_text()
    assert "lower is better" in svg and "WikiText word ppl" in svg
    assert "chance" in (out / "plots" / "task_bars.svg").read_text()


def test_retained_is_student_over_teacher():
    refs = {r.name: r for r in load_references()}
    kept = retained(refs["Llama-3.1-Minitron-4B-Width"], refs["Llama-3.1-8B"])
    assert kept == pytest.approx({"MMLU": 100 * 60.5 / 65.3, "HellaSwag": 100 * 76.1 / 81.8, "GSM8K": 100 * 41.2 / 48.6})


def test_references_are_published_rows_with_sources():
    rows = load_references()
    assert {r.name for r in rows} >= {"Llama-3.1-8B", "Llama-3.1-Minitron-4B-Width", "Llama-3.1-Minitron-4B-Depth",
                                     "Granite-3.1-2B-Instruct", "Granite-3.1-8B-Instruct"}  # fmt: skip
    for row in rows:
        assert row.published and row.source and set(row.scores) <= set(ACCURACY)
    depth = next(r for r in rows if r.name == "Llama-3.1-Minitron-4B-Depth")
    assert depth.scores == {"MMLU": 58.7, "HellaSwag": 73.2, "GSM8K": 16.8} and depth.shots["HellaSwag"] == 10


def test_references_schema_rejects_typos(tmp_path):
    bad = tmp_path / "references.yaml"
    bad.write_text("format_version: 1\nreferences:\n- {name: x, hub_id: y, kind: base, params: 1, source: s, scores: {MMLU: {value: 1, shot: 5}}}\n")
    with pytest.raises(UserError, match="shot"):
        load_references(bad)


class _Cells(HTMLParser):
    """Collects every <td data-value> (with its text) and every <svg> inside a <figure>."""

    def __init__(self):
        super().__init__()
        self.cells, self.svgs, self._cell, self._row, self._figure = [], 0, None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "tr":
            self._row = attrs.get("data-model")
        if tag == "figure":
            self._figure = attrs.get("id")
        if tag == "svg" and self._figure:
            self.svgs += 1
        if tag == "td" and "data-value" in attrs:
            self._cell = {"model": self._row, "label": attrs["data-label"], "value": float(attrs["data-value"]), "text": ""}

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self.cells.append(self._cell)
            self._cell = None
        if tag == "figure":
            self._figure = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell["text"] += data


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(results, tmp_path):
    out = write_report(results, tmp_path / "board")
    page = out / "leaderboard.html"
    text = page.read_text()
    # Nothing to fetch at view time: no external scripts, styles, images or fonts.
    assert not re.search(r"""(?:src|href)\s*=\s*["']?(?:https?:)?//|url\(\s*["']?(?:https?:)?//|@import|<script""", text)
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"]  # fmt: skip
    dom = subprocess.run([CHROMIUM, *flags, "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr
    parsed = _Cells()
    parsed.feed(dom.stdout)
    assert parsed.svgs == 4  # accuracy vs parameters, per-task bars, perplexity, retained (published pairs)
    # The numbers in the rendered page are the numbers in the results files.
    for path in results:
        section = json.loads(path.read_text())["minitron"]
        name = section["model"]["name"]
        shown = {c["label"]: c for c in parsed.cells if c["model"] == name}
        assert set(shown) == set(section["summary"])
        for label, row in section["summary"].items():
            assert shown[label]["value"] == row["value"]
            scale = 100 if row["higher_is_better"] else 1
            assert shown[label]["text"].startswith(f"{row['value'] * scale:.2f}")
    shot = tmp_path / "page.png"
    subprocess.run([CHROMIUM, *flags, "--window-size=1280,2400", f"--screenshot={shot}", page.as_uri()],
                   capture_output=True, timeout=120, check=True)  # fmt: skip
    assert shot.stat().st_size > 50_000  # a rendered page, not a blank one


@pytest.mark.parametrize("case", ["lm-eval", "future", "not-json", "missing"])
def test_foreign_results_are_one_line_and_write_nothing(results, tmp_path, case):
    bad = tmp_path / "bad.json"
    data = json.loads(results[0].read_text())
    if case == "lm-eval":
        del data["minitron"]
        bad.write_text(json.dumps(data))
        needle = "written by lm-eval"
    elif case == "future":
        data["minitron"]["format_version"] = 99
        bad.write_text(json.dumps(data))
        needle = "format_version 99"
    elif case == "not-json":
        bad.write_text("{results: ")
        needle = "not valid JSON"
    else:
        needle = "no such file"
    out = tmp_path / "board"
    assert_user_error(run("report", results[0], bad, "-o", out), str(bad), needle)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == (["bad.json"] if case != "missing" else [])


DELETE = object()
# A results file valid but for one value, each of which used to end in a traceback half-way through the report:
# key path in the minitron section → the value put there (DELETE: the key removed).
MALFORMED = {
    "accuracy-above-1": (("summary", "MMLU", "value"), 7.0),
    "accuracy-negative": (("summary", "MMLU", "value"), -3),
    "accuracy-a-bool": (("summary", "GSM8K", "value"), True),
    "accuracy-a-string": (("summary", "HellaSwag", "value"), "0.5"),
    "perplexity-infinite": (("summary", "WikiText word ppl", "value"), math.inf),  # json writes Infinity
    "stderr-negative": (("summary", "MMLU", "stderr"), -0.1),
    "samples-negative": (("summary", "MMLU", "samples"), -1),
    "params-a-string": (("model", "params", "total"), "10M"),
    "no-timing": (("timing",), DELETE),
    "no-device": (("settings", "device"), DELETE),
    "generations-not-objects": (("generations", "samples"), [1, 2]),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_values_are_one_line_naming_the_key_and_write_nothing(results, tmp_path, case):
    keys, value = MALFORMED[case]
    data = json.loads(results[0].read_text())
    parent = data["minitron"]
    for key in keys[:-1]:
        parent = parent[key]
    if value is DELETE:
        del parent[keys[-1]]
    else:
        parent[keys[-1]] = value
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    out = tmp_path / "board"
    result = minitron_in_process("report", results[0], bad, "-o", out)
    assert_user_error(result, str(bad), "minitron." + ".".join(keys), "minitron eval")
    assert not out.exists()


def _table_widths(md: str) -> list[set[int]]:
    """For each Markdown table, the numbers of cells its lines have (an escaped ``\\|`` splits no cell)."""
    blocks = itertools.groupby(md.splitlines(), key=lambda line: line.startswith("|"))
    return [{len(re.split(r"(?<!\\)\|", line)) for line in lines} for table, lines in blocks if table]


def test_a_name_with_a_newline_or_pipe_keeps_the_markdown_tables_whole(results, tmp_path):
    data = json.loads(results[0].read_text())
    data["minitron"]["model"]["name"] = "a\nb | c"  # what `minitron eval --name` records
    named = tmp_path / "named.json"
    named.write_text(json.dumps(data))
    md = (write_report([named, results[1]], tmp_path / "board") / "leaderboard.md").read_text()
    tables = _table_widths(md)
    assert len(tables) >= 4 and all(len(widths) == 1 for widths in tables), md
    for line in ("| a b \\| c | teacher |", "| tiny-student | a b \\| c |", "| prompt | a b \\| c | tiny-student |",
                 "- **a b \\| c**: "):
        assert line in md, line


def test_existing_output_is_refused(results, tmp_path):
    out = tmp_path / "board"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_report(results, out)
    write_report(results, out, overwrite=True)
    assert (out / "leaderboard.html").is_file()


def test_models_on_the_same_spot_share_one_label_in_the_accuracy_plot():
    from minitron.report_plots import plot_accuracy_vs_params

    # The quickstart's case: pruned and distilled students, same size, the same MMLU score.
    rows = [_row("pruned", {"MMLU": 23.75}, {"MMLU": 4.86}), _row("distilled", {"MMLU": 23.75}, {"MMLU": 4.86}),
            _row("other", {"MMLU": 30.0}, {"MMLU": 4.0})]
    svg = plot_accuracy_vs_params(rows)
    assert svg.count("pruned, distilled") == 1 and ">other<" in svg.replace(" ", "")


def test_chance_is_named_in_the_legend_not_on_the_points():
    from minitron.report_plots import plot_accuracy_vs_params

    # GSM8K's chance is 0 %, where small students land: a "chance" label drawn at the axis' edge sat on their point.
    rows = [_row("teacher", {"GSM8K": 0.0, "MMLU": 30.0}, {"GSM8K": 0.0, "MMLU": 4.0}),
            _row("student", {"GSM8K": 0.0, "MMLU": 25.0}, {"GSM8K": 0.0, "MMLU": 4.0})]
    svg = plot_accuracy_vs_params(rows)
    assert svg.count("chance") == 1 and "chance level" in svg  # once, for both panels, in the figure's legend

"""`minitron report`: students linked to teachers, published rows kept apart, a self-contained HTML page whose
numbers (checked in a real headless Chromium) are those of the results files."""

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

from minitron.errors import UserError
from minitron.evaluate import evaluate
from minitron.report import ACCURACY, load_references, load_results, retained, write_report
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
    assert sorted(p.name for p in (out / "plots").iterdir()) == ["accuracy_vs_params.svg", "retained.svg", "task_bars.svg"]
    # Every measured number appears as the Markdown shows it.
    for row in (teacher, student):
        for label, value in row.scores.items():
            assert f"{value:.2f}" in md, label
    assert "## Published (not measured here)" in md and "| Llama-3.1-Minitron-4B-Width | 4.51B | 60.50 (5-shot) |" in md


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
    assert parsed.svgs == 3  # accuracy vs parameters, per-task bars, retained accuracy
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


def test_existing_output_is_refused(results, tmp_path):
    out = tmp_path / "board"
    out.mkdir()
    with pytest.raises(UserError, match="already exists"):
        write_report(results, out)
    write_report(results, out, overwrite=True)
    assert (out / "leaderboard.html").is_file()

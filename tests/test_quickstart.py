"""`minitron quickstart` end to end on the bundled teacher, at reduced sizes: the artifacts of every stage,
and that distillation brings the pruned student back towards the teacher."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from minitron import assets, quickstart
from minitron.errors import UserError

# The bundled teacher (None), as the product runs it.
TEACHER = None
# The same pipeline at a size that runs in about a minute on one core: 64-token blocks, 40 distillation
# steps, one document per evaluation task (all four tasks, as the product runs them).
SMALL = dict(steps=40, batch=4, seq_len=64, samples=8, eval_limit=1)
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def done(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("qs") / "minitron-quickstart"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINITRON_CACHE", str(cache))
        record = quickstart.run(out, teacher=TEACHER, show_progress=False, **SMALL)
    return out, record


def params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_every_stage_leaves_its_artifact(done):
    out, record = done
    layout = quickstart.Layout(out)
    assert layout.scores.is_file()
    for name in quickstart.MODELS:
        assert layout.results(name).is_file()
    assert (layout.leaderboard / "leaderboard.md").is_file() and (layout.leaderboard / "leaderboard.html").is_file()
    assert json.loads(layout.summary.read_text()) == json.loads(json.dumps(record))
    assert (layout.distill_run / "recipe.yaml").is_file() and not (layout.distill_run / "final").exists()
    assert not [p.name for p in out.parent.iterdir() if p.name.startswith(".")]  # no temporary leftovers


def test_pruned_and_distilled_are_stock_checkpoints_of_half_the_teacher(done):
    out, record = done
    teacher = AutoModelForCausalLM.from_pretrained(TEACHER or assets.teacher_path(), dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(out / "pruned", dtype=torch.float32)
    distilled = AutoModelForCausalLM.from_pretrained(out / "distilled", dtype=torch.float32)
    assert params(pruned) == params(distilled) == record["models"]["pruned"]["params"]
    assert params(teacher) == record["models"]["teacher"]["params"]
    assert 0.48 < params(pruned) / params(teacher) < 0.52
    # Width only: every layer and head kept, the embedding and the MLP narrower.
    assert pruned.config.num_hidden_layers == teacher.config.num_hidden_layers
    assert pruned.config.num_attention_heads == teacher.config.num_attention_heads
    assert pruned.config.hidden_size < teacher.config.hidden_size
    # Distillation changed every weight it trained.
    for (name, a), b in zip(pruned.named_parameters(), distilled.parameters()):
        assert not torch.equal(a, b), name


def test_distillation_lowers_the_students_held_out_loss(done):
    out, record = done
    d = record["distill"]
    evals = [json.loads(x) for x in (out / "distill" / "metrics.jsonl").read_text().splitlines()]
    evals = [e for e in evals if "eval_lm" in e]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == SMALL["steps"]
    assert d["heldout_lm_before"] == evals[0]["eval_lm"] and d["heldout_lm_after"] == evals[-1]["eval_lm"]
    assert d["heldout_lm_after"] < d["heldout_lm_before"]
    assert d["heldout_kl_after"] < d["heldout_kl_before"]


def test_results_and_leaderboard_show_the_measured_numbers(done):
    out, record = done
    markdown = (out / "leaderboard" / "leaderboard.md").read_text()
    html = (out / "leaderboard" / "leaderboard.html").read_text()
    for name in quickstart.MODELS:
        results = json.loads((out / "results" / f"{name}.json").read_text())
        assert {"mmlu", "hellaswag", "gsm8k", "wikitext"} <= set(results["results"])
        ppl = results["minitron"]["summary"][quickstart.WIKITEXT]["value"]
        assert math.isfinite(ppl) and ppl > 1 and record["models"][name]["scores"][quickstart.WIKITEXT] == ppl
        assert f"{ppl:.2f}" in markdown and f"{ppl:.2f}" in html
    # Both students are linked to the teacher they came from.
    assert json.loads((out / "results" / "distilled.json").read_text())["minitron"]["lineage"]["teacher"]


def test_summary_names_the_leaderboard_and_one_line_per_model(done):
    _, record = done
    lines = quickstart.summary_lines(record)
    assert record["leaderboard"]["html"] in lines[0]
    assert len(lines) == 4
    for line, name in zip(lines[1:], quickstart.MODELS):
        ppl = record["models"][name]["scores"][quickstart.WIKITEXT]
        assert quickstart.LABELS[name] in line and f"{ppl:,.1f}" in line


def test_existing_output_is_refused_with_one_line_before_any_work(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    cache = tmp_path / "cache"
    result = subprocess.run(
        [sys.executable, "-m", "minitron.cli", "quickstart", "-o", str(out), "--steps", "1"],
        capture_output=True, text=True, env={**ENV, "MINITRON_CACHE": str(cache)}, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1 and "--overwrite" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert [p.name for p in out.iterdir()] == ["mine.txt"] and not cache.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["taken"]


def test_a_failing_stage_removes_the_new_folder_and_restores_the_old(tmp_path, monkeypatch):
    def fail(teacher, text, layout, settings, show):
        layout.scores.write_text("half written")
        raise UserError("calibration went wrong")

    monkeypatch.setattr(quickstart, "importance_stage", fail)
    monkeypatch.setattr(quickstart, "training_text", lambda: tmp_path / "text.jsonl")
    fresh = tmp_path / "fresh"
    with pytest.raises(UserError):
        quickstart.run(fresh, teacher=TEACHER, show_progress=False)
    assert not fresh.exists()
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text("{}")
    with pytest.raises(UserError):
        quickstart.run(old, overwrite=True, teacher=TEACHER, show_progress=False)
    assert [p.name for p in old.iterdir()] == ["summary.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old"]


def test_bad_settings_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="--steps"):
        quickstart.run(tmp_path / "x", steps=0)
    with pytest.raises(UserError, match="unknown setting"):
        quickstart.run(tmp_path / "x", stepz=3)
    assert not (tmp_path / "x").exists()

"""`minitron study --quick` on a tiny trained teacher: the artifact's structure, and the first finding the method
rests on (keeping the most important units beats keeping the least important ones)."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from clirun import assert_user_error, minitron

from minitron import assets
from minitron.data import token_blocks
from minitron.errors import UserError
from minitron.search_scoring import short_distill
from minitron.importance import Scores
from minitron.study import QUICK, inverted_scores, parity, random_scores, run_study
from test_evaluate import byte_tokenizer
from tiny import tiny_model


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama trained for a few seconds on WikiText-2 articles, so that its units differ in importance."""
    root = tmp_path_factory.mktemp("study")
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=0, vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    docs = assets.read_articles()[:120]
    (root / "text.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    blocks = token_blocks(tok, docs, seq_len=32, samples=512, seed=9)
    short_distill(model, None, blocks, steps=150, lr=3e-3, batch_size=16, seed=0, objective="lm")
    model.save_pretrained(root / "teacher")
    tok.save_pretrained(root / "teacher")
    return root


@pytest.fixture(scope="module")
def study(teacher):
    return run_study(teacher / "out", teacher=teacher / "teacher", text=teacher / "text.jsonl", quick=True, workers=1)


def test_quick_study_artifact(study):
    assert sorted(p.name for p in study.iterdir()) == ["plots", "results.json", "study.md"]
    assert sorted(p.name for p in (study / "plots").iterdir()) == ["depth.svg", "importance.svg", "retraining.svg", "search.svg"]
    record = json.loads((study / "results.json").read_text())
    r = record["results"]
    assert set(r) == {"teacher_loss", "importance", "depth", "width_vs_depth", "retraining", "search"}
    assert record["settings"]["seeds"] == 3 and record["quick"]
    # One shape for every importance method; random over three seeds.
    assert len(r["importance"]) == 4 + 3  # four aggregations, magnitude, random, inverted
    assert len(r["importance"]["random"]["pruned"]["values"]) == 3
    assert set(r["depth"]) == {"block", "loss", "window", "random"}
    n_drop = record["teacher"]["shape"]["layers"] - record["shapes"]["depth"]["layers"]
    assert all(len(r["depth"][k]["dropped_layers"]) == n_drop for k in ("block", "loss", "window"))
    w, d = r["width_vs_depth"]["width"], r["width_vs_depth"]["depth"]
    assert abs(w["params"] - d["params"]) <= 0.1 * d["params"] and len(w["distilled"]["values"]) == 3
    curves = r["retraining"]["curves"]
    assert set(curves) == {"pruned + kd", "pruned + lm", "pruned + kd+lm", "scratch + lm"}
    assert curves["scratch + lm"][-1][0] == QUICK.scratch_factor * curves["pruned + kd"][-1][0]
    assert len(r["search"]["after"]) == 3 and len(r["search"]["candidates"]) == QUICK.top_k
    # Distillation helps the pruned student; every number the Markdown states is in the JSON.
    assert r["importance"]["activation (batch l2, seq mean)"]["distilled"] < r["importance"]["activation (batch l2, seq mean)"]["pruned"]
    md = (study / "study.md").read_text()
    for section in ("## 1. Importance", "## 2. Depth", "## 3. Width vs depth", "## 4. Retraining", "## 5. Search"):
        assert section in md
    assert f"{r['teacher_loss']:.3f}" in md and "Tokens to parity" in md


def test_inverted_importance_is_worse_than_activation(study):
    r = json.loads((study / "results.json").read_text())["results"]["importance"]
    activation, inverted = r["activation (batch l2, seq mean)"], r["inverted activation"]
    assert inverted["pruned"] > activation["pruned"]
    assert inverted["distilled"] > activation["distilled"]


def test_workers_give_the_same_numbers(teacher, study, tmp_path):
    """The parts are independent labs with their own seeds: run in two processes, every number is the same."""
    parallel = run_study(tmp_path / "out", teacher=teacher / "teacher", text=teacher / "text.jsonl", quick=True, workers=2)
    one, two = (json.loads((d / "results.json").read_text()) for d in (study, parallel))
    assert one["results"] == two["results"] and two["machine"]["workers"] == 2


def test_other_rankings_keep_the_measured_norm_energies():
    """Random and inverted rankings replace every ranking of units, not the norms' calibration energies, which
    the pruner rescales by whichever units are kept (a random or negated energy would make a random scale)."""
    like = Scores({"hidden": torch.rand(8), "neurons.0": torch.rand(16), "norm_energy": torch.rand(3, 8) + 1}, {})
    for other in (random_scores(like, 0), inverted_scores(like)):
        assert torch.equal(other["norm_energy"], like["norm_energy"])
        assert not torch.equal(other["hidden"], like["hidden"])
        assert not torch.equal(other["neurons.0"], like["neurons.0"])


def test_parity_measured_extrapolated_or_not_reached():
    curve = [(0, 5.0), (100, 4.0), (200, 3.0), (400, 2.0)]
    measured = parity((10, 2.5), curve)
    assert measured["how"] == "measured" and measured["scratch_tokens"] == pytest.approx(300) and measured["ratio"] == pytest.approx(30)
    falling = [(0, 8.0), (100, 4.0), (200, 2.0), (400, 1.0), (800, 0.5)]  # loss ∝ tokens^-1
    far = parity((10, 0.25), falling)
    assert far["how"].startswith("extrapolated") and far["scratch_tokens"] == pytest.approx(1600) and far["ratio_at_least"] == 80
    flat = parity((10, 0.1), [(0, 3.0), (100, 2.0), (200, 2.0), (400, 2.0), (800, 2.1)])
    assert flat["ratio"] is None and flat["ratio_at_least"] == 80


def test_bad_inputs_are_one_line_and_write_nothing(teacher, tmp_path):
    with pytest.raises(UserError, match="not a local checkpoint"):
        run_study(tmp_path / "out", teacher=tmp_path / "missing", quick=True)
    (tmp_path / "few.txt").write_text("one\n\ntwo\n")
    assert_user_error(minitron("study", "--teacher", teacher / "teacher", "--text", tmp_path / "few.txt", "--quick",
                               "-o", tmp_path / "out"), "few.txt", "too few")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["few.txt"]
    (tmp_path / "short.txt").write_text("\n\n".join(f"document {i} has five words" for i in range(40)) + "\n")
    # Refused before the teacher loads: transformers' loading bar would make the error more than one line.
    assert_user_error(minitron("study", "--teacher", teacher / "teacher", "--text", tmp_path / "short.txt", "--quick",
                               "-o", tmp_path / "out"), "--text", "too short for this study: the study's training text")
    assert not (tmp_path / "out").exists()
    (tmp_path / "taken").mkdir()
    with pytest.raises(UserError, match="already exists"):
        run_study(tmp_path / "taken", teacher=teacher / "teacher", quick=True)


_ORPHAN = textwrap.dedent(
    """
    import multiprocessing, os, sys, time
    from concurrent.futures import ProcessPoolExecutor
    from minitron.study import worker_start

    def report_and_wait(path):
        open(path, "w").write(str(os.getpid()))
        time.sleep(120)

    if __name__ == "__main__":
        pool = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=worker_start, initargs=(1, os.getpid()))
        pool.submit(report_and_wait, sys.argv[1])
        time.sleep(120)
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_a_study_killed_with_sigkill_takes_its_workers_with_it(tmp_path):
    script, pid_file = tmp_path / "study_like.py", tmp_path / "worker.pid"
    script.write_text(_ORPHAN)
    study = subprocess.Popen([sys.executable, str(script), str(pid_file)], cwd=tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not (pid_file.is_file() and pid_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.2)
        worker = int(pid_file.read_text())
        study.kill()  # SIGKILL: no cleanup code runs in the study's process
        study.wait()
        deadline = time.monotonic() + 10
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker outlived the study"
    finally:
        study.kill()
        if pid_file.is_file() and pid_file.read_text() and _alive(int(pid_file.read_text())):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)  # only if the test failed


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False
    return "State:\tZ" not in status  # a zombie has exited; only its parent's wait is missing

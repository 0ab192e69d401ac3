"""The search run (`minitron prune --target`): ranking candidates, writing the best with search.json, the CLI."""

import json
import random
from pathlib import Path

import pytest
import torch
from clirun import assert_user_error, minitron
from tiny import save_tiny, tiny_ids, tiny_model, tiny_tokenizer
from transformers import AutoModelForCausalLM

from minitron.errors import UserError
from minitron.families import Shape
from minitron.importance import compute_scores
from minitron.search import Ranking, rank_candidates, run
from minitron.search_depth import DepthChooser
from minitron.search_grid import Request
from minitron.search_scoring import HeldOut

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"

WORDS = "the quick brown fox jumps over the lazy dog a small model learns from a big model by distillation".split()


def write_calib(path, docs=60, seed=0):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(docs)) + "\n")
    return path


def tiny_checkpoint(tmp_path, family, **overrides):
    folder = tmp_path / f"{family}-teacher"
    save_tiny(family, folder, initializer_range=0.3, **overrides)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class Calib:  # the fields of prune.Calibration that the search reads
    def __init__(self, data, samples=4, seq_len=16, batch_size=2, seed=0):
        self.data, self.samples, self.seq_len, self.batch_size, self.seed = data, samples, seq_len, batch_size, seed


def test_ranking_is_deterministic_for_a_seed_and_never_touches_the_teacher():
    teacher = tiny_model("llama", initializer_range=0.3)
    ids = tiny_ids(n=6, seq=16)
    scores = compute_scores(teacher, ids[:4], batch_size=2, show_progress=False)
    shape = Shape.from_config(teacher.config)
    shortlist = Request.parse(shape, target="0.6x", axes="width,depth").candidates()[:3]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    heldout = HeldOut(teacher, ids[4:], batch_size=2, need_teacher=True)
    depth = DepthChooser("window", teacher, scores, heldout, "kl")
    runs = [
        rank_candidates(teacher, shortlist, scores, heldout, rank_by="kl", depth=depth, search_steps=2,
                        train_blocks=ids[:4], lr=1e-3, batch_size=2, seed=seed)
        for seed in (0, 0, 1)
    ]  # fmt: skip
    first, again, other_seed = ([(r.candidate.shape, r.drop_layers, r.score) for r in ranked] for ranked in runs)
    assert first == again
    assert [s for *_, s in first] == sorted(s for *_, s in first)  # best (lowest) first
    assert {s for *_, s in first} != {s for *_, s in other_seed}  # the seed does reach the short distillation
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_search_run_writes_the_best_candidate(family_name, tmp_path):
    src = tiny_checkpoint(tmp_path, family_name)
    shape = Shape.from_config(AutoModelForCausalLM.from_pretrained(src).config)
    request = Request.parse(shape, target="0.6x", axes="width,depth", prune_heads=True)
    out = tmp_path / "student"
    info = run(
        str(src), shape, request, Ranking(top_k=2, heldout_samples=2, rank_by="kl"), out=out,
        calibration=Calib(write_calib(tmp_path / "calib.txt")), show_progress=False,
    )  # fmt: skip
    record = json.loads((out / "search.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    chosen = record["chosen"]
    evaluated = [c for c in record["candidates"] if "rank" in c]
    assert len(evaluated) == 2 and chosen["score"] == min(c["score"] for c in evaluated)
    assert all(chosen[k] == plan["student"][k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "experts"))
    assert plan["dropped_layers"] == chosen["drop_layers"] == info["dropped_layers"]
    student = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, nothing custom
    assert sum(p.numel() for p in student.parameters()) == chosen["params"]
    assert abs(chosen["params"] - request.budget.total) <= request.budget.tolerance * request.budget.total
    assert record["ranking"]["heldout"]["follows_importance_blocks"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# --- the CLI: `minitron prune --target` ----------------------------------------------------------------------


cli = minitron


# --- the CLI: `minitron prune --target` ----------------------------------------------------------------------


cli = minitron


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--target", "3B", "--axes", "depth"], ["layers ≥ 16", "--limit layers="]),
        (["--target", "1x"], ["--target", "between 0 and 1"]),
        (["--target", "9B"], ["--target", "not smaller"]),
        (["--target", "4B", "--hidden-size", "3072"], ["--hidden-size", "either --target"]),
        (["--target", "4B", "--axes", "experts"], ["--axes experts", "no experts"]),
        (["--target", "4B", "--limit", "ffn=2"], ["--limit"]),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, args, needles):
    out = tmp_path / "student"
    result = cli("prune", SHARED / "llama-3.1-8b", "-o", out, *args)
    assert_user_error(result, *needles)
    assert not list(tmp_path.iterdir())


def test_cli_search_end_to_end(tmp_path):
    src = tiny_checkpoint(tmp_path, "qwen2")
    calib = write_calib(tmp_path / "calib.txt")
    out = tmp_path / "student"
    args = ["prune", src, "--target", "0.6x", "--axes", "width,depth", "--calib", calib, "--samples", "4",
            "--seq-len", "16", "--heldout-samples", "2", "--top-k-candidates", "2", "--search-steps", "1", "-o", out]
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["search"]["ranking"]["search_steps"] == 1
    assert json.loads((out / "search.json").read_text()) == info["search"]
    assert json.loads((out / "plan.json").read_text())["student"]["hidden"] == info["search"]["chosen"]["hidden"]
    assert "--target 0.6x" in (out / "README.md").read_text()  # the command is in the model card
    again = cli(*args)  # the output exists: refused before any work, nothing changed
    assert_user_error(again, "already exists")


def test_one_candidate_from_saved_scores_needs_no_weights_loaded(tmp_path, capsys):
    src = tiny_checkpoint(tmp_path, "granitemoe")
    teacher = AutoModelForCausalLM.from_pretrained(src)
    scores = compute_scores(teacher, tiny_ids(), batch_size=2, show_progress=False)
    scores.save(tmp_path / "scores.safetensors")
    shape = Shape.from_config(teacher.config)
    request = Request.parse(shape, target="0.6x", axes="width,experts")
    with pytest.raises(UserError, match="--calib"):  # five candidates cannot be ranked without data
        run(str(src), shape, request, Ranking(), out=tmp_path / "a", scores_file=tmp_path / "scores.safetensors")
    run(str(src), shape, request, Ranking(top_k=1), out=tmp_path / "b", scores_file=tmp_path / "scores.safetensors",
        show_progress=False)  # fmt: skip
    record = json.loads((tmp_path / "b" / "search.json").read_text())
    assert record["chosen"]["score"] is None and record["chosen"]["hidden"] == request.candidates()[0].shape.hidden
    assert not (tmp_path / "a").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert record["chosen"]["hidden"] < shape.hidden  # embedding channels cut, so the norms are rescaled
    assert json.loads((tmp_path / "b" / "plan.json").read_text())["norm_scale"]
    assert "note:" not in capsys.readouterr().err
    # Scores as an older minitron wrote them (no norm_energy): the same student, unrescaled, and one note.
    del scores.tensors["norm_energy"]
    scores.save(tmp_path / "old.safetensors")
    run(str(src), shape, request, Ranking(top_k=1), out=tmp_path / "c", scores_file=tmp_path / "old.safetensors",
        show_progress=False)  # fmt: skip
    assert json.loads((tmp_path / "c" / "plan.json").read_text())["norm_scale"] == []
    err = capsys.readouterr().err
    assert err.count("note:") == 1 and "old.safetensors has no norm_energy" in err


def test_a_destination_without_room_for_the_winner_is_refused_before_calibration(tmp_path, monkeypatch):
    import shutil

    import minitron.search_scoring
    from minitron import artifacts, importance

    src = tiny_checkpoint(tmp_path, "llama")
    shape = Shape.from_config(AutoModelForCausalLM.from_pretrained(src).config)
    request = Request.parse(shape, target="0.6x", axes="width")
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(artifacts.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    for module, name in ((importance, "compute_scores"), (minitron.search_scoring.HeldOut, "__init__")):
        monkeypatch.setattr(module, name, lambda *a, **k: pytest.fail("calibration started"))
    with pytest.raises(UserError, match="not enough free space"):
        run(str(src), shape, request, Ranking(top_k=2), out=tmp_path / "student",
            calibration=Calib(write_calib(tmp_path / "calib.txt")), show_progress=False)  # fmt: skip
    assert not (tmp_path / "student").exists()

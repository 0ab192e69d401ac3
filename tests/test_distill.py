"""The distillation loop on tiny models: it learns, it is exact under regrouping, it resumes bitwise."""

import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny import save_tiny, tiny_config, tiny_tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

import minitron.distill as distill
import minitron.distill_data as distill_data
from minitron.distill import lr_at, train
from minitron.distill_data import Blocks, World, packed_blocks
from minitron.errors import UserError
from minitron.recipe import load_recipe

REPO = Path(__file__).parents[1]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
DATA = REPO / "tests" / "data" / "shakespeare-8k.txt"
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1"}


def save_checkpoint(path, model_type, seed=0, **overrides):
    save_tiny(model_type, path, seed=seed, **overrides)
    tiny_tokenizer().save_pretrained(path)
    return path


def make_pair(root, model_type="llama", **student_overrides):
    teacher = save_checkpoint(root / "teacher", model_type)
    if getattr(tiny_config(model_type), "layer_types", None) is not None:  # Qwen2 lists a type per layer
        student_overrides.setdefault("layer_types", ["full_attention"] * 2)
    student = save_checkpoint(root / "student", model_type, seed=1, num_hidden_layers=2, **student_overrides)
    return teacher, student


def overrides(root, teacher, student, run="run", *extra):
    return [
        f"teacher.path={teacher}", f"student.path={student}", f"data.source={DATA}",
        f"data.cache_dir={root / 'cache'}", f"output.dir={root / run}", *extra,
    ]  # fmt: skip


def recipe(root, teacher, student, run="run", *extra):
    return load_recipe(TINY, overrides(root, teacher, student, run, *extra))


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def final_weights(run_dir):
    return load_file(Path(run_dir) / "final" / "model.safetensors")


# --- it learns, on every family -----------------------------------------------------------------------------------


def test_tiny_student_learns_from_tiny_teacher(tmp_path, family_name):
    teacher, student = make_pair(tmp_path, family_name)
    # No weight decay: a parameter that got no gradient would then stay exactly as it was.
    final = train(recipe(tmp_path, teacher, student, "run", "budget.steps=8", "optimizer.weight_decay=0"))

    before = dict(AutoModelForCausalLM.from_pretrained(student).named_parameters())
    after = dict(AutoModelForCausalLM.from_pretrained(final).named_parameters())  # stock loading
    assert before.keys() == after.keys()
    unchanged = [name for name, p in before.items() if torch.equal(p, after[name])]
    assert not unchanged, f"parameters that did not train: {unchanged}"

    evals = [m for m in metrics(tmp_path / "run") if "eval_kl" in m]
    assert [m["step"] for m in evals] == [0, 4, 8]
    assert evals[-1]["eval_kl"] < evals[0]["eval_kl"], evals

    assert AutoTokenizer.from_pretrained(final).get_vocab() == AutoTokenizer.from_pretrained(student).get_vocab()
    card = (final / "README.md").read_text()
    assert "## Distillation" in card and str(teacher) in card and "final eval kl" in card
    assert (final / "distill_recipe.yaml").is_file()


def test_lm_only_mode_trains_without_a_teacher(tmp_path):
    _, student = make_pair(tmp_path)
    run = recipe(tmp_path, "unused", student, "run", "teacher=null", "loss.kd=0", "loss.lm=1", "budget.steps=8")
    assert run.teacher is None
    train(run)
    evals = [m for m in metrics(tmp_path / "run") if "eval_lm" in m]
    assert all("eval_kl" not in m for m in evals)
    assert evals[-1]["eval_lm"] < evals[0]["eval_lm"]
    assert "none (LM loss only)" in (tmp_path / "run" / "final" / "README.md").read_text()


def test_hidden_state_losses_train_a_projection_that_is_not_saved(tmp_path, monkeypatch):
    teacher, student = make_pair(tmp_path, hidden_size=32)  # narrower student: a 32 → 64 projection is needed
    projections = []
    # save_checkpoint lives in distill_state; distill's loop calls it through distill's own name, patched here.
    real = distill.save_checkpoint

    def spy(run_dir, step, model, *args, **kwargs):
        projections.append(model.hidden_losses[0].proj.weight.detach().clone())
        return real(run_dir, step, model, *args, **kwargs)

    monkeypatch.setattr(distill, "save_checkpoint", spy)
    final = train(recipe(tmp_path, teacher, student, "run", "loss.hidden.pairs=[[1, 2], [2, 4]]", "loss.lm=0.5"))
    steps = [m for m in metrics(tmp_path / "run") if "loss" in m]
    assert all(m["hidden"] > 0 and m["lm"] > 0 for m in steps)
    assert len(projections) == 2 and not torch.equal(projections[0], projections[1])
    assert not any("hidden_losses" in name for name in final_weights(tmp_path / "run"))
    state = load_file(tmp_path / "run" / "checkpoints" / "step-00000008" / "model.safetensors")
    assert state["hidden_losses.0.proj.weight"].shape == (64, 32)  # …but it is in the checkpoints
    AutoModelForCausalLM.from_pretrained(final)


def test_bf16_runs_and_saves_bf16(tmp_path):
    teacher, student = make_pair(tmp_path)
    final = train(recipe(tmp_path, teacher, student, "run", "precision=bf16", "budget.steps=2"))
    assert all(math.isfinite(m.get("loss", 0.0)) for m in metrics(tmp_path / "run"))
    assert {t.dtype for t in final_weights(tmp_path / "run").values()} == {torch.bfloat16}
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2


# --- exact under regrouping ------------------------------------------------------------------------------------------


def test_one_by_four_accumulation_equals_four_by_one(tmp_path):
    teacher, student = make_pair(tmp_path)
    common = ("budget.steps=3", "batch.global=4", "eval.every=0", "checkpoint.every=0", "loss.lm=0.5")
    train(recipe(tmp_path, teacher, student, "acc", *common, "batch.micro=1", "batch.accumulation=4"))
    train(recipe(tmp_path, teacher, student, "big", *common, "batch.micro=4", "batch.accumulation=1"))
    acc, big = final_weights(tmp_path / "acc"), final_weights(tmp_path / "big")
    for name in big:
        torch.testing.assert_close(acc[name], big[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(metrics(tmp_path / "acc"), metrics(tmp_path / "big")):
        assert a.keys() == b.keys()
        for key in ("loss", "kl", "lm", "eval_kl", "grad_norm"):
            if key in a:
                assert a[key] == pytest.approx(b[key], rel=1e-5)


def test_two_processes_equal_one(tmp_path):
    teacher, student = make_pair(tmp_path)
    common = ("budget.steps=3", "batch.global=4", "eval.every=0", "checkpoint.every=2")
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "minitron.cli", "distill", TINY, *overrides(tmp_path, teacher, student, "two", *common, "batch.micro=1")],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=240,
    )  # fmt: skip
    assert two.returncode == 0, two.stderr[-3000:]
    train(recipe(tmp_path, teacher, student, "one", *common, "batch.micro=4"))
    one_w, two_w = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    for name in one_w:
        torch.testing.assert_close(two_w[name], one_w[name], rtol=1e-5, atol=1e-6)
    two_m = [m for m in metrics(tmp_path / "two") if "loss" in m]
    one_m = [m for m in metrics(tmp_path / "one") if "loss" in m]
    assert [m["loss"] for m in two_m] == pytest.approx([m["loss"] for m in one_m], rel=1e-5)
    # Each process saved its own RNG state in the (FSDP-gathered) checkpoint.
    names = {p.name for p in (tmp_path / "two" / "checkpoints" / "step-00000002").iterdir()}
    assert {"rng-0.safetensors", "rng-1.safetensors", "model.safetensors", "optimizer.pt", "state.json"} <= names


# --- checkpoints and resume ------------------------------------------------------------------------------------------

_KILLER = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    torch.set_num_threads(1)
    import minitron.distill as distill
    from minitron.recipe import load_recipe

    calls, real = 0, distill.train_step
    def killing_step(*args, **kwargs):
        global calls
        calls += 1
        if calls == int(sys.argv[1]):  # killed while computing this step: no chance to clean up
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)

    distill.train_step = killing_step
    distill.train(load_recipe(sys.argv[2], sys.argv[3:]))
    """
)


def test_resume_after_sigkill_is_bitwise_equal_to_an_uninterrupted_run(tmp_path):
    teacher, student = make_pair(tmp_path, "granite")
    common = ("budget.steps=8", "checkpoint.every=2", "eval.every=2")
    train(recipe(tmp_path, teacher, student, "straight", *common))

    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, "6", TINY, *overrides(tmp_path, teacher, student, "killed", *common)],
        capture_output=True, text=True, cwd=REPO, env=ENV, timeout=240,
    )  # fmt: skip
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    run = tmp_path / "killed"
    assert not (run / "final").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000002", "step-00000004"]
    assert max(m["step"] for m in metrics(run)) == 5  # step 5 was done after the last checkpoint

    with pytest.raises(UserError, match="already exists"):
        train(recipe(tmp_path, teacher, student, "killed", *common))  # no --resume: refused, nothing touched
    train(recipe(tmp_path, teacher, student, "killed", *common), resume=True)

    straight, resumed = final_weights(tmp_path / "straight"), final_weights(run)
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name
    drop = {"tokens_per_s"}  # wall-clock
    assert [{k: v for k, v in m.items() if k not in drop} for m in metrics(run)] == [
        {k: v for k, v in m.items() if k not in drop} for m in metrics(tmp_path / "straight")
    ]


def test_checkpoints_and_the_final_student_get_the_users_umask(tmp_path):
    teacher, student = make_pair(tmp_path)
    previous = os.umask(0o022)
    try:
        train(recipe(tmp_path, teacher, student, "run", "budget.steps=2", "checkpoint.every=1", "eval.every=0"))
    finally:
        os.umask(previous)
    run = tmp_path / "run"
    written = [p for p in (run / "final").iterdir()] + list((run / "checkpoints" / "step-00000001").iterdir())
    assert {p.name for p in written} >= {"model.safetensors", "optimizer.pt", "rng-0.safetensors", "config.json"}
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in written} == {p.name: "0o644" for p in written}


@pytest.mark.parametrize(
    "file, damage",
    [("state.json", lambda b: b[:-10]), ("model.safetensors", lambda b: b[: len(b) // 2]),
     ("optimizer.pt", lambda b: b[: len(b) // 2]), ("rng-0.safetensors", lambda b: b"\x00" * 8)],
)
def test_resume_refuses_a_damaged_checkpoint_before_loading_any_model(tmp_path, monkeypatch, file, damage):
    teacher, student = make_pair(tmp_path)
    common = ("budget.steps=3", "checkpoint.every=1", "eval.every=0")  # checkpoints at steps 1 and 2
    train(recipe(tmp_path, teacher, student, "run", *common))
    run = tmp_path / "run"
    shutil.rmtree(run / "final")  # as if killed in the last step
    damaged = run / "checkpoints" / "step-00000002" / file
    damaged.write_bytes(damage(damaged.read_bytes()))

    def never(*args, **kwargs):
        raise AssertionError("a model was loaded before the checkpoint was checked")

    with monkeypatch.context() as m:
        m.setattr(distill, "load_models", never)
        with pytest.raises(UserError) as e:
            train(recipe(tmp_path, teacher, student, "run", *common), resume=True)
    assert all(words in e.value.line() for words in (str(damaged), "damaged checkpoint", "delete that step-* folder"))
    # The advice works: without the damaged step, the run resumes from the one before.
    shutil.rmtree(damaged.parent)
    assert train(recipe(tmp_path, teacher, student, "run", *common), resume=True).is_dir()
    assert [m["step"] for m in metrics(run) if "loss" in m][-2:] == [2, 3]


def test_resume_refuses_a_changed_recipe(tmp_path):
    teacher, student = make_pair(tmp_path)
    train(recipe(tmp_path, teacher, student, "run", "budget.steps=2"))
    with pytest.raises(UserError, match="'loss' section differs"):
        train(recipe(tmp_path, teacher, student, "run", "budget.steps=2", "loss.temperature=2"), resume=True)
    with pytest.raises(UserError, match="optimizer.betas differs"):
        train(recipe(tmp_path, teacher, student, "run", "budget.steps=2", "optimizer.betas=[0.8,0.9]"), resume=True)
    # Cadence may change; a finished run is left as it is.
    assert train(recipe(tmp_path, teacher, student, "run", "budget.steps=2", "eval.every=1"), resume=True).is_dir()


def test_non_finite_loss_stops_at_its_step_and_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    teacher, student = make_pair(tmp_path)
    real = distill.save_checkpoint

    def poison_after_save(run_dir, step, model, *args, **kwargs):
        saved = real(run_dir, step, model, *args, **kwargs)
        with torch.no_grad():  # from here on the student computes NaN
            model.student.base_model.norm.weight.fill_(float("nan"))
        return saved

    monkeypatch.setattr(distill, "save_checkpoint", poison_after_save)
    with pytest.raises(UserError) as e:
        train(recipe(tmp_path, teacher, student, "run", "checkpoint.every=2"))
    line = e.value.line()
    assert "student diverged at step 3" in line and "teacher's output is finite" in line and "step-00000002" in line
    run = tmp_path / "run"
    assert f"minitron distill {run / 'recipe.yaml'} --resume optimizer.lr=" in line  # advice that can be followed
    assert not (run / "final").exists()
    kept = run / "checkpoints" / "step-00000002"
    assert json.loads((kept / "state.json").read_text())["step"] == 2
    assert all(torch.isfinite(t).all() for t in load_file(kept / "model.safetensors").values())
    # The failed step is recorded, as valid JSON: NaN becomes null and is named.
    failed = metrics(run)[-1]
    assert failed["step"] == 3 and failed["loss"] is None and "loss" in failed["nonfinite"]


def test_the_advice_after_divergence_can_be_followed_and_is_recorded(tmp_path, monkeypatch):
    teacher, student = make_pair(tmp_path)
    real = distill.save_checkpoint

    def poison_after_save(run_dir, step, model, *args, **kwargs):
        saved = real(run_dir, step, model, *args, **kwargs)
        with torch.no_grad():
            model.student.base_model.norm.weight.fill_(float("inf"))
        return saved

    monkeypatch.setattr(distill, "save_checkpoint", poison_after_save)
    run_args = ("budget.steps=6", "checkpoint.every=2")
    with pytest.raises(UserError) as e:
        train(recipe(tmp_path, teacher, student, "run", *run_args))
    monkeypatch.undo()
    advice = shlex.split(e.value.line().split("`")[1])  # minitron distill RECIPE --resume optimizer.lr=…
    assert advice[:2] == ["minitron", "distill"] and advice[3] == "--resume"
    resumed = load_recipe(advice[2], advice[4:])
    assert train(resumed, resume=True).is_dir()

    records = metrics(tmp_path / "run")
    change = next(r for r in records if "resumed_with_changes" in r)
    assert change["step"] == 2
    assert change["resumed_with_changes"] == {"optimizer.lr": [3e-3, resumed.optimizer.lr]}
    # From the resumed step on, the schedule is the one of the new peak learning rate.
    lrs = {r["step"]: r["lr"] for r in records if "lr" in r}
    for step in (3, 4, 5, 6):
        assert lrs[step] == pytest.approx(lr_at(step - 1, resumed.optimizer, 6))
    assert all(json.dumps(r, allow_nan=False) for r in records)


def test_a_non_finite_teacher_is_blamed_not_the_learning_rate(tmp_path, monkeypatch):
    teacher, student = make_pair(tmp_path)
    real = distill.load_models

    def bad_teacher(*args, **kwargs):
        model = real(*args, **kwargs)
        with torch.no_grad():
            model.teacher.base_model.layers[0].mlp.down_proj.weight.fill_(float("nan"))
        return model

    monkeypatch.setattr(distill, "load_models", bad_teacher)
    with pytest.raises(UserError) as e:
        train(recipe(tmp_path, teacher, student, "run"))
    assert "teacher's output is not finite" in e.value.line() and "no learning rate" in e.value.line()
    assert str(teacher) in e.value.line()


def test_resume_with_nothing_to_resume_is_refused(tmp_path):
    teacher, student = make_pair(tmp_path)
    with pytest.raises(UserError, match="nothing to resume"):
        train(recipe(tmp_path, teacher, student, "never-started"), resume=True)
    assert not (tmp_path / "never-started").exists()


@pytest.mark.parametrize(
    "extra, words",
    [
        (["eval.blocks=100000"], "held out for evaluation"),
        (["data.seq_len=1000"], "more than the student's context"),
        (["loss.hidden.pairs=[[1,9]]"], "teacher layer 9"),
    ],
)
def test_refused_inputs_leave_no_run_folder(tmp_path, extra, words):
    teacher, student = make_pair(tmp_path)
    with pytest.raises(UserError, match=words):
        train(recipe(tmp_path, teacher, student, "run", *extra))
    assert not (tmp_path / "run").exists()  # a corrected rerun is not refused as "already exists"


# --- data and schedule -----------------------------------------------------------------------------------------------


def test_data_is_tokenized_once_and_cached(tmp_path, monkeypatch):
    tokenizer = tiny_tokenizer()
    data = load_recipe(TINY, [f"data.source={DATA}", f"data.cache_dir={tmp_path}"]).data
    world = World(rank=0, size=1, device=torch.device("cpu"))
    first = np.array(packed_blocks(data, tokenizer, world))
    monkeypatch.setattr(distill_data, "_tokenize_to", lambda *a: pytest.fail("tokenized twice"))
    again = packed_blocks(data, tokenizer, world)
    assert np.array_equal(first, again) and first.shape[1] == 32
    # The cached stream is the documents joined with EOS, as the tokenizer sees them.
    expected = tokenizer(DATA.read_text().split("\n\n")[0], add_special_tokens=False)["input_ids"]
    assert first.reshape(-1)[: len(expected) + 1].tolist() == expected + [tokenizer.eos_token_id]
    # Another tokenizer is another cache entry.
    monkeypatch.undo()
    packed_blocks(data, tiny_tokenizer(100), world)
    assert len(list(tmp_path.iterdir())) == 2


def test_each_step_reads_the_same_blocks_whatever_the_number_of_processes():
    blocks = np.arange(50 * 4, dtype=np.uint32).reshape(50, 4)
    data = Blocks(blocks, heldout=6, seed=3)
    assert len(set(data.heldout) & set(data.train)) == 0 and len(data.train) == 44

    def rows(step, size, micro):
        worlds = [World(rank=r, size=size, device=torch.device("cpu")) for r in range(size)]
        return sorted(tuple(row.tolist()) for w in worlds for b in data.step(step, 8, micro, w) for row in b)

    for step in (0, 5, 11):  # step 5 crosses an epoch boundary (44 blocks, 8 a step)
        assert rows(step, 1, 8) == rows(step, 2, 1) == rows(step, 4, 2)
    first_five = [row for step in range(5) for row in rows(step, 1, 8)]
    assert len(set(first_five)) == 40  # no block twice within an epoch
    train_rows = {tuple(blocks[i].tolist()) for i in data.train}
    assert {row for step in range(6) for row in rows(step, 1, 8)} == train_rows  # …and all of them in it



def test_eval_blocks_never_changes_which_blocks_train_and_held_out_blocks_never_train():
    """The held-out region is the run's (``reserve``): any ``eval.blocks`` within it reads the same training
    blocks in the same order, and evaluates only on blocks that no step ever reads."""
    blocks = np.arange(60 * 4, dtype=np.uint32).reshape(60, 4)
    world = World(rank=0, size=1, device=torch.device("cpu"))
    runs = {k: Blocks(blocks, heldout=k, seed=3, reserve=8) for k in (1, 4, 8)}

    def trained(data):  # 20 steps of 8: past two epochs of the 52 training blocks
        return [tuple(row.tolist()) for step in range(20) for b in data.step(step, 8, 4, world) for row in b]

    orders = {k: trained(data) for k, data in runs.items()}
    assert orders[1] == orders[4] == orders[8]
    for k, data in runs.items():
        assert len(data.heldout) == k and set(data.heldout) <= set(runs[8].heldout)
        assert not {tuple(blocks[i].tolist()) for i in data.heldout} & set(orders[k])
    with pytest.raises(UserError, match="eval.blocks"):
        Blocks(blocks, heldout=9, seed=3, reserve=8)


def test_resume_with_other_eval_blocks_trains_the_same_blocks(tmp_path):
    teacher, student = make_pair(tmp_path)
    common = ("budget.steps=4", "checkpoint.every=2", "eval.every=0")
    train(recipe(tmp_path, teacher, student, "straight", *common))  # eval.blocks 8
    run = tmp_path / "resumed"
    shutil.copytree(tmp_path / "straight", run)
    shutil.rmtree(run / "final")  # as if stopped after the step-2 checkpoint: steps 3 and 4 run again
    train(recipe(tmp_path, teacher, student, "resumed", *common, "eval.blocks=4"), resume=True)
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(run)
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert json.loads((run / "checkpoints" / "step-00000002" / "state.json").read_text())["heldout_reserve"] == 8

def test_learning_rate_warms_up_then_decays_to_the_minimum():
    cfg = load_recipe(TINY, ["optimizer.lr=1e-4", "optimizer.min_lr=1e-5", "optimizer.warmup_steps=40"]).optimizer
    assert lr_at(0, cfg, 1000) == pytest.approx(1e-4 / 40)
    assert lr_at(39, cfg, 1000) == pytest.approx(1e-4)
    assert lr_at(40, cfg, 1000) == pytest.approx(1e-4)
    assert lr_at(520, cfg, 1000) == pytest.approx(1e-5 + 0.5 * 9e-5)
    assert lr_at(1000, cfg, 1000) == pytest.approx(1e-5)
    assert all(lr_at(s, cfg, 1000) >= lr_at(s + 1, cfg, 1000) for s in range(40, 1000))

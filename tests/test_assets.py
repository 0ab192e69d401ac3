"""The files shipped in minitron/assets: the bundled teacher, its text, the eval samples, and the script
that trains the teacher (deterministic from a seed, resumable)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from clirun import assert_user_error
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from minitron import assets
from minitron.errors import UserError

REPO = Path(__file__).resolve().parents[1]
MB = 1024 * 1024


@pytest.fixture(scope="module")
def training() -> dict:
    return json.loads((assets.teacher_path() / "training.json").read_text())


@pytest.fixture(scope="module")
def teacher():
    path = assets.teacher_path()
    # bf16 on disk; computed in float32 on the CPU, as the card's numbers were.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------- the teacher


def test_teacher_is_a_stock_llama_within_size_limits(teacher, training):
    model, tokenizer = teacher
    folder = assets.teacher_path()
    assert model.config.model_type == "llama" and type(model).__name__ == "LlamaForCausalLM"
    assert (folder / "model.safetensors").stat().st_size <= 30 * MB
    with safe_open(folder / "model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    params = sum(p.numel() for p in model.parameters())
    assert params == training["params"]
    assert 10e6 <= params <= 30e6  # "about 10-30M parameters" (issue 6)
    # The tokenizer and the model agree on the vocabulary and the special tokens.
    assert len(tokenizer) == model.config.vocab_size
    assert tokenizer.eos_token_id == model.config.eos_token_id == model.generation_config.eos_token_id
    assert tokenizer.pad_token_id == model.config.pad_token_id != tokenizer.eos_token_id
    total = sum(p.stat().st_size for p in Path(assets.__file__).parent.rglob("*") if p.is_file())
    assert total <= 35 * MB


def test_tokenizer_is_lossless_on_shipped_text(teacher):
    _, tokenizer = teacher
    text = assets.read_articles(assets.validation_text())[0][:3000]
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == text
    # No special token is added behind the user's back (lm-eval and minitron.data add EOS themselves).
    assert tokenizer("The game").input_ids == tokenizer("The game", add_special_tokens=False).input_ids


def test_teacher_generates_english_from_its_corpus(teacher):
    model, tokenizer = teacher
    prompt = tokenizer("The city of", return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    again = model.generate(**prompt, max_new_tokens=24, do_sample=False)
    assert torch.equal(out, again)
    new = tokenizer.decode(out[0, prompt.input_ids.shape[1] :])
    assert out.shape[1] > prompt.input_ids.shape[1]
    # A trained model writes words, not byte soup: mostly letters and spaces.
    assert sum(c.isalpha() or c.isspace() for c in new) / max(1, len(new)) > 0.7, new


def test_teacher_perplexity_on_valid_slice_matches_card(teacher, training):
    """Loss on the first ~4k tokens of the shipped valid text, in the card's scoring, sits near the card's
    full-valid number; an untrained model of the same shape is far above it."""
    model, tokenizer = teacher
    first = assets.read_articles(assets.validation_text())[0]
    ids = [tokenizer.eos_token_id] + tokenizer(first, add_special_tokens=False).input_ids
    seq = model.config.max_position_embeddings
    blocks = torch.tensor(ids[: 16 * seq + 1]).unfold(0, seq + 1, seq)  # 16 blocks, 4,096 targets
    with torch.no_grad():
        logits = model(input_ids=blocks[:, :-1]).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), blocks[:, 1:].flatten()).item()
    card = training["valid"]["loss"]
    assert abs(loss - card) < 0.5, (loss, card)  # one article vs all 60: same ballpark, not the same number
    assert math.exp(loss) < 0.1 * model.config.vocab_size  # far from a uniform guess
    # The card states the machine-readable numbers.
    readme = (assets.teacher_path() / "README.md").read_text()
    assert f"{training['valid']['ppl']:.2f}" in readme and f"{training['valid']['loss']:.4f}" in readme
    assert "CC BY-SA" in readme and "scripts/train_teacher.py" in readme


# ---------------------------------------------------------------- shipped text and eval samples


def test_shipped_wikitext_decompresses(training):
    for path, articles in ((assets.calibration_text(), 629), (assets.validation_text(), 60)):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            records = [json.loads(line) for line in f]
        assert len(records) == articles
        assert all(r["text"].strip() and r["title"] and r["words"] > 0 for r in records)
        # Detokenized like lm-eval's wikitext task: no " @-@ " left, and " , " only where the source itself
        # has an empty list item (one article: "arc , , like" → "arc, , like").
        assert not any(" @-@ " in r["text"] for r in records)
        assert sum(r["text"].count(" , ") for r in records) <= 2
    assert sum(json.loads(line)["words"] for line in gzip.open(assets.validation_text(), "rt")) == (
        training["valid"]["words"]
    )
    assert "CC BY-SA" in (assets.calibration_text().parent / "SOURCE.md").read_text()


def test_eval_samples_have_sources_and_parse():
    root = assets.eval_data_dir()
    for task in ("mmlu", "hellaswag", "gsm8k", "wikitext-2-raw"):
        assert "License" in (root / task / "SOURCE.md").read_text()
        assert all(p.stat().st_size > 0 for p in (root / task).rglob("*") if p.is_file())
    for split, rows in (("test", 50), ("dev", 5)):
        for path in (root / "mmlu" / split).glob("*.csv"):
            table = list(csv.reader(path.open(encoding="utf-8")))
            assert table[0] == ["question", "choice0", "choice1", "choice2", "choice3", "answer"]
            assert len(table) == rows + 1 and {r[5] for r in table[1:]} <= {"0", "1", "2", "3"}
    lines = (root / "hellaswag" / "hellaswag_val_full.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 6 * 200 and all(lines[i] in {"0", "1", "2", "3"} for i in range(1, len(lines), 6))
    for split, n in (("test", 100), ("train", 50)):
        records = [json.loads(x) for x in (root / "gsm8k" / f"{split}.jsonl").read_text().splitlines()]
        assert len(records) == n and all("####" in r["answer"] for r in records)
    raw = (root / "wikitext-2-raw" / "wiki.test.raw").read_text(encoding="utf-8")
    assert len(re.findall(r"(?m)^ = [^=].* = $", raw)) == 62


def test_eval_samples_load_with_the_eval_readers():
    from minitron import eval_data

    root = assets.eval_data_dir()
    assert eval_data.mmlu_subjects(root) == ["abstract_algebra", "high_school_geography", "marketing", "philosophy"]
    eval_data.check(root, ["mmlu", "hellaswag", "gsm8k", "wikitext"])


def test_wheel_package_data_covers_assets():
    # setuptools ships package data by these globs: every asset must match one.
    text = (REPO / "pyproject.toml").read_text()
    assert '"assets/**/*"' in text


# ---------------------------------------------------------------- the training script


def _script(name: str = "train_teacher"):
    """``scripts/NAME.py`` as a module (the scripts folder is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_args(tmp_path: Path, name: str, seed: int = 0) -> list[str]:
    return [
        "train", "--out", str(tmp_path / name), "--work", str(tmp_path / f"{name}-work"), "--seed", str(seed),
        "--steps", "4", "--max-articles", "6", "--valid-articles", "1", "--eval-every", "2",
        "--vocab", "300", "--hidden", "32", "--layers", "1", "--heads", "2", "--kv-heads", "1", "--ffn", "64",
        "--seq-len", "32", "--batch", "2", "--warmup", "2",
    ]  # fmt: skip


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / "model.safetensors")


def _interrupted_after_first_checkpoint(script, monkeypatch, argv: list[str]) -> None:
    """Run the script with ``argv`` and stop it (KeyboardInterrupt) right after its first checkpoint."""
    real_save = script.save_checkpoint

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(script, "save_checkpoint", save_then_stop)
        with pytest.raises(KeyboardInterrupt):
            script.main(argv)


def test_script_same_seed_same_run_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    script = _script()
    script.main(_tiny_args(tmp_path, "a"))
    script.main(_tiny_args(tmp_path, "b"))
    a, b = (json.loads((tmp_path / n / "training.json").read_text()) for n in ("a", "b"))
    assert a["first_loss"] == b["first_loss"] and a["valid"] == b["valid"]
    wa = _weights(tmp_path / "a")
    assert all(torch.equal(wa[k], v) for k, v in _weights(tmp_path / "b").items())

    script.main(_tiny_args(tmp_path, "seed1", seed=1))
    assert json.loads((tmp_path / "seed1" / "training.json").read_text())["first_loss"] != a["first_loss"]

    # Interrupt right after the step-2 checkpoint, then run the same command again: it resumes there.
    _interrupted_after_first_checkpoint(script, monkeypatch, _tiny_args(tmp_path, "c"))
    assert not (tmp_path / "c").exists()  # nothing half-written
    assert json.loads((tmp_path / "c-work" / "last" / "state.json").read_text())["step"] == 2
    script.main(_tiny_args(tmp_path, "c"))
    wc = _weights(tmp_path / "c")
    assert all(torch.equal(wa[k], v) for k, v in wc.items())
    tok = AutoTokenizer.from_pretrained(tmp_path / "c")
    assert tok.decode(tok("Valkyria Chronicles").input_ids) == "Valkyria Chronicles"


def test_script_refuses_existing_output_before_work(tmp_path):
    (tmp_path / "a").mkdir()
    with pytest.raises(UserError, match="already exists"):
        _script().main(_tiny_args(tmp_path, "a"))
    assert not (tmp_path / "a-work").exists()
    # Run as a command, a user error is one line on stderr and exit code 2, as from the minitron CLI.
    ran = subprocess.run([sys.executable, str(REPO / "scripts" / "train_teacher.py"), *_tiny_args(tmp_path, "a")],
                         capture_output=True, text=True, timeout=300)
    assert_user_error(ran, "already exists", "--overwrite")
    assert not (tmp_path / "a-work").exists()


def _continue_args(tmp_path: Path, source: str, name: str, steps: int = 4) -> list[str]:
    return ["continue", "--from", str(tmp_path / source), "--out", str(tmp_path / name),
            "--work", str(tmp_path / f"{name}-work"), "--steps", str(steps), "--warmup", "1", "--eval-every", "2"]


def test_script_continue_reads_on_in_data_order_adds_up_the_stages_and_resumes(tmp_path, monkeypatch):
    script = _script()
    script.main(_tiny_args(tmp_path, "a"))
    steps_read: list[int] = []
    real_batch_for = script.batch_for

    def recording_batch_for(step, *args, **kwargs):
        steps_read.append(step)
        return real_batch_for(step, *args, **kwargs)

    monkeypatch.setattr(script, "batch_for", recording_batch_for)
    script.main(_continue_args(tmp_path, "a", "b"))
    assert steps_read == [4, 5, 6, 7]  # the batches the 4-step run would have read next
    monkeypatch.setattr(script, "batch_for", real_batch_for)

    a, b = (json.loads((tmp_path / n / "training.json").read_text()) for n in ("a", "b"))
    assert b["steps"] == 8 and b["tokens_seen"] == 2 * a["tokens_seen"]
    assert b["epochs"] == pytest.approx(2 * a["epochs"], abs=2e-3)
    assert [h["step"] for h in b["history"]] == [2, 4, 6, 8] and b["history"][:2] == a["history"]
    (stage,) = b["continued"]
    assert stage["first_step"] == 5 and stage["steps"] == 4
    assert stage["command"].startswith("python scripts/train_teacher.py continue --steps 4 ")
    card = (tmp_path / "b" / "README.md").read_text()
    assert a["command"] in card and stage["command"] in card and "re-warm-up 1 steps to 0.0005" in card
    assert stage["valid_loss_from"] == a["valid"]["loss"] and "Continuing for steps 5–8 took the loss" in card
    assert stage["raw_test_loss_from"] == a.get("wikitext_raw_test", {}).get("loss")
    assert "load average steps 1–4: " in card and f"steps 5–8: {stage['load_average'][0]:.1f} at the start" in card
    wa, wb = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert not all(torch.equal(wa[k], v) for k, v in wb.items())  # it trained
    assert b["valid"]["loss"] != a["valid"]["loss"]  # and was scored again
    for name in ("tokenizer.json", "tokenizer_config.json"):  # the tokenizer is the teacher's, unchanged
        assert (tmp_path / "b" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()

    # Stopped after its first checkpoint, the same command resumes and gives the uninterrupted weights.
    _interrupted_after_first_checkpoint(script, monkeypatch, _continue_args(tmp_path, "a", "c"))
    assert not (tmp_path / "c").exists()
    script.main(_continue_args(tmp_path, "a", "c"))
    assert all(torch.equal(wb[k], v) for k, v in _weights(tmp_path / "c").items())

    # A continued teacher continues again: the stages accumulate.
    script.main(_continue_args(tmp_path, "b", "d", steps=2))
    d = json.loads((tmp_path / "d" / "training.json").read_text())
    assert d["steps"] == 10 and [c["first_step"] for c in d["continued"]] == [5, 9]
    assert [h["step"] for h in d["history"]] == [2, 4, 6, 8, 10]


def test_script_continue_refuses_a_folder_that_is_not_a_trained_teacher(tmp_path):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="training.json: not found"):
        _script().main(_continue_args(tmp_path, "plain", "out"))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-work").exists()


def _staged_summary() -> dict:
    """A teacher trained 2,000 steps, then continued 1,000 on the same machine and 1,000 on another, the
    training batches' loss falling below the valid loss in the last stage."""
    history = [{"step": k, "train_loss": 4.0 if k <= 3000 else 3.0, "valid_loss": 3.8 if k <= 3000 else 3.5}
               for k in range(500, 4001, 500)]
    stage = {"first_step": 2001, "steps": 1000, "machine": "cpu A", "valid_loss_from": 4.0, "raw_test_loss_from": 4.6}
    later = {"first_step": 3001, "steps": 1000, "machine": "cpu B", "valid_loss_from": 3.9, "raw_test_loss_from": 4.5}
    return {"steps": 4000, "machine": "cpu A", "history": history, "continued": [stage, later],
            "valid": {"loss": 3.85}, "wikitext_raw_test": {"loss": 4.48}}


def test_teacher_card_names_each_machine_once_per_run_of_stages():
    card = _script("teacher_card")
    s = _staged_summary()
    assert card.machine_note(s) == "steps 1–3,000: cpu A; steps 3,001–4,000: cpu B"
    s["continued"][1]["machine"] = "cpu A"
    assert card.machine_note(s) == "cpu A, every stage"


def test_teacher_card_gives_each_stage_its_raw_test_change_and_the_train_valid_gap():
    card = _script("teacher_card")
    note = card.plateau_note(_staged_summary())
    # Stage 2,001–3,000 ended where the next one started (4.6 → 4.5); the last ended at the summary's score.
    assert "from 4.0000 to 3.9000" in note and "raw test split from 4.6000 to 4.5000 (-0.1000 per 1,000 steps)" in note
    assert "raw test split from 4.5000 to 4.4800 (-0.0200 per 1,000 steps)" in note
    assert "+0.200 at step 2,000, +0.200 at step 3,000, -0.500 at step 4,000" in note
    s = _staged_summary()
    del s["continued"][0]["raw_test_loss_from"]  # a stage from before the raw test was recorded
    assert note.count("raw test split") == 2 and card.plateau_note(s).count("raw test split") == 1

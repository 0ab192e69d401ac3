"""`minitron eval`: local tasks render exactly the hub tasks' requests, a tiny model runs through real lm-eval
on the committed samples, bad input is one line and exit code 2 with nothing written."""

import csv
import dataclasses
import json
import os
import re
from pathlib import Path

import datasets
import lm_eval.tasks
import pytest
import torch
from clirun import assert_user_error, minitron
from lm_eval.api.task import ConfigurableTask
from lm_eval.tasks import TaskManager
from lm_eval.tasks._yaml_loader import load_yaml

from minitron import eval_data
from minitron.errors import UserError
from minitron.evaluate import PROMPTS, eval_dir, evaluate, generate_samples, parse_tasks, summarize
from tiny import tiny_model

SAMPLES = Path(__file__).parent / "data" / "eval"
HUB = Path(lm_eval.tasks.__file__).parent


# --- a tiny checkpoint that lm-eval can run ----------------------------------------------------------------


def byte_tokenizer():
    """A lossless byte-level tokenizer: 256 bytes + <s>, </s>, <pad>.

    tests/tiny.py's tiny_tokenizer() maps characters it has not seen (capitals, digits) to <unk>, which would
    make MMLU's answer letters A-D one and the same token.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def save_checkpoint(path: Path, seed: int = 0, card: str | None = None) -> Path:
    tok = byte_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tiny_model("llama", seed=seed, vocab_size=len(tok), max_position_embeddings=512, **ids)
    # Greedy decoding of a random model runs to lm-eval's 256-token cap on every GSM8K question. A residual
    # channel that is constant for every token, read only by the EOS row of the head, ends generations at
    # once and keeps the test fast; the other logits are untouched.
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        model.lm_head.weight[tok.eos_token_id].zero_()
        model.lm_head.weight[tok.eos_token_id, 0] = 1.2 * torch.sign(model.model.norm.weight[0])
    model.save_pretrained(path)
    tok.save_pretrained(path)
    if card is not None:
        (path / "README.md").write_text(card)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-student", card=PRUNED_CARD)


PRUNED_CARD = """---
library_name: transformers
tags:
- minitron
- pruned
---

# Pruned from tiny-teacher

## Pruning

|  |  |
|---|---|
| teacher | /models/tiny-teacher |
| date | 2026-01-01T00:00:00+00:00 |

## Distillation

|  |  |
|---|---|
| date | 2026-01-02T00:00:00+00:00 |
| teacher | /models/tiny-teacher-corrected |
| tokens | 1000 |
"""


run = minitron


# --- local tasks == hub tasks --------------------------------------------------------------------------------


def local_task(name: str, data_dir: Path = SAMPLES):
    manager = TaskManager(include_path=str(eval_dir() / "tasks"), include_defaults=False, metadata={"data_dir": str(data_dir)})
    return manager.load([name])["tasks"][name]


def hub_task(yaml_path: str, splits: dict[str, list[dict]]):
    """lm-eval's built-in task from its own YAML (templates, few-shot rules, metrics, its !functions), with the
    hub download replaced by the given documents: no network here."""
    cfg = load_yaml(HUB / yaml_path)
    cfg.pop("dataset_path", None)
    cfg.pop("dataset_name", None)
    cfg["custom_dataset"] = lambda **_: datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in splits.items()})
    return ConfigurableTask(config=cfg)


def rendered(task, shots: int, limit: int | None = None):
    """The requests lm-eval would send to a model, and the settings that turn answers into metrics."""
    task.set_config(key="num_fewshot", value=shots)
    task.set_fewshot_seed(seed=1234)  # simple_evaluate's default few-shot seed
    task.build_all_requests(limit=limit, rank=0, world_size=1)
    requests = [(i.request_type, i.doc_id, i.idx, i.args) for i in task.instances]
    c = task.config
    settings = (c.output_type, c.target_delimiter, c.fewshot_delimiter, c.description, c.metric_list,
                c.generation_kwargs, c.filter_list, c.fewshot_config)  # fmt: skip
    return requests, settings


def mmlu_hub_docs(subject: str) -> dict[str, list[dict]]:
    """The committed CSVs in the ``cais/mmlu`` layout (question, subject, choices, integer answer)."""
    splits = {}
    for split in ("test", "dev"):
        with (SAMPLES / "mmlu" / split / f"{subject}_{split}.csv").open(newline="", encoding="utf-8") as f:
            splits[split] = [
                {"question": r["question"], "subject": subject, "choices": [r[f"choice{i}"] for i in range(4)], "answer": int(r["answer"])}
                for r in csv.DictReader(f)
            ]
    return splits


@pytest.mark.parametrize("subject", ["abstract_algebra", "high_school_geography", "philosophy"])
def test_mmlu_local_renders_like_hub(subject):
    hub = hub_task(f"mmlu/default/mmlu_{subject}.yaml", mmlu_hub_docs(subject))
    local = local_task(f"mmlu_{subject}")
    expected, hub_settings = rendered(hub, shots=5)
    got, local_settings = rendered(local, shots=5)
    assert got == expected and local_settings == hub_settings
    assert len(got) == 8 * 4  # every question, four answer letters each
    context = got[0][3][0]
    assert context.count("\nAnswer:") == 6 and context.endswith("Answer:")  # 5 dev examples + the question


def test_gsm8k_local_renders_like_hub():
    splits = {s: [json.loads(line) for line in (SAMPLES / "gsm8k" / f"{s}.jsonl").read_text().splitlines()] for s in ("test", "train")}
    expected, hub_settings = rendered(hub_task("gsm8k/gsm8k.yaml", splits), shots=5)
    got, local_settings = rendered(local_task("gsm8k"), shots=5)
    assert got == expected and local_settings == hub_settings
    assert len(got) == 30 and got[0][3][0].count("Question:") == 6


# Documents in the hub's Rowan/hellaswag layout. The first two are the first two items of the committed
# sample as the original jsonl has them; the others are made up to cover WikiHow markup with an empty ctx_b
# and a ctx_b with a capital inside (which the hub's .capitalize() lower-cases).
HELLASWAG_ORIGINAL = [
    {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.", "is holding a rubik's cube.",
                 "starts pulling up roofing on a roof."], "label": "3"},
    {"activity_label": "Clean and jerk", "ctx_a": "A lady walks to a barbell. She bends down and grabs the pole.",
     "ctx_b": "the lady", "endings": ["swings and lands in her arms.", "pulls the barbell forward.",
                                      "pulls a rope attached to the barbell.", "stands and lifts the weight over her head."],
     "label": "3"},
    {"activity_label": "Home and Garden", "ctx_a": "[header] How to boil water [title] Fill a kettle. [step] Put it on the stove.",
     "ctx_b": "", "endings": ["Wait until it whistles. [substeps] Pour.", "Paint the [title] kettle red.", "Eat the stove.", "Sing."],
     "label": "0"},
    {"activity_label": "Playing bagpipes", "ctx_a": "A person plays in a park.", "ctx_b": "the man in the Blue shirt",
     "endings": ["walks away.", "sits down.", "waves.", "plays along."], "label": "2"},
]  # fmt: skip


def hellaswag_text_copy(docs) -> str:
    """The 6-line text layout, made the way the committed copy was (hub preprocess of label + full ctx)."""
    from lm_eval.tasks.hellaswag.utils import preprocess

    lines = []
    for d in docs:
        ctx = (d["ctx_a"] + " " + d["ctx_b"]).strip()
        lines += [preprocess(d["activity_label"] + ": " + ctx), d["label"], *(preprocess(e) for e in d["endings"])]
    return "\n".join(lines) + "\n"


def test_hellaswag_local_renders_like_hub(tmp_path):
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text(hellaswag_text_copy(HELLASWAG_ORIGINAL))
    hub = hub_task("hellaswag/hellaswag.yaml", {"train": HELLASWAG_ORIGINAL, "validation": HELLASWAG_ORIGINAL})
    expected, hub_settings = rendered(hub, shots=0)
    got, local_settings = rendered(local_task("hellaswag", tmp_path), shots=0)
    assert [r[3] for r in got] == [r[3] for r in expected]  # identical (context, continuation) pairs
    # Same settings, except where few-shot examples come from: validation here (no train copy), see the YAML.
    assert local_settings[:-1] == hub_settings[:-1] and local_settings[-1].split == "validation"
    assert dataclasses.replace(local_settings[-1], split=None) == hub_settings[-1]
    contexts = {r[3][0] for r in got}
    assert "Roof shingle removal: A man is sitting on a roof. He" in contexts  # ctx_b capitalised as the hub does
    assert "Playing bagpipes: A person plays in a park. The man in the blue shirt" in contexts
    # The committed sample: the hub's own preprocessing applied to our documents gives 50 items of 4 choices.
    sample, _ = rendered(local_task("hellaswag"), shots=0)
    assert len(sample) == 200 and sample[0][3] == ("Roof shingle removal: A man is sitting on a roof. He", " is using wrap to wrap a pair of skis.")


def test_hellaswag_text_copy_loses_leading_tag_spaces(tmp_path):
    """Known and documented: where a WikiHow ending *starts* with a tag, the hub's preprocess() leaves a
    leading space (continuation "  Wait", two spaces); the text copy has stripped it, so the local task
    sends " Wait". This pins the difference down so that a change on either side shows up here."""
    doc = dict(HELLASWAG_ORIGINAL[2], endings=["[substeps] Wait.", "Stir.", "Eat the stove.", "Sing."])
    (tmp_path / "hellaswag").mkdir()
    (tmp_path / "hellaswag" / "hellaswag_val_full.txt").write_text(hellaswag_text_copy([doc]).replace("\n Wait.", "\nWait."))
    hub, _ = rendered(hub_task("hellaswag/hellaswag.yaml", {"train": [doc], "validation": [doc]}), shots=0)
    local, _ = rendered(local_task("hellaswag", tmp_path), shots=0)
    assert hub[0][3][1] == "  Wait." and local[0][3][1] == " Wait."
    assert [r[3] for r in hub[1:]] == [r[3] for r in local[1:]]


def test_hellaswag_ten_shot_never_shows_the_scored_item():
    task = local_task("hellaswag")
    requests, _ = rendered(task, shots=10, limit=20)
    docs = list(task.eval_docs)
    for request_type, doc_id, idx, (context, _) in requests:
        examples = context.split("\n\n")
        assert len(examples) == 11  # 10 solved examples + the item
        assert docs[doc_id]["query"] not in examples[:-1]


def test_wikitext_local_renders_like_hub():
    pages = list(eval_data.read_wikitext_pages(SAMPLES / "wikitext-2-raw" / "wiki.test.raw"))
    hub = hub_task("wikitext/wikitext.yaml", {"train": pages[:1], "validation": pages[:1], "test": pages})
    expected, hub_settings = rendered(hub, shots=0)
    local = local_task("wikitext")
    got, local_settings = rendered(local, shots=0)
    assert got == expected and local_settings == hub_settings
    # Word and byte counts (the perplexity denominators) come from the hub's own function on both sides.
    assert local.process_results(pages[0], [-1234.5]) == hub.process_results(pages[0], [-1234.5])


def test_wikitext_pages_cut_at_article_titles(tmp_path):
    raw = " \r\n = Alpha = \r\n \r\n Alpha text . \r\n \r\n = = Section = = \r\n \r\n More . \r\n \r\n = Beta = \r\n \r\n Beta text . \r\n \r\n"
    path = tmp_path / "wiki.test.raw"
    path.write_bytes(raw.encode())
    pages = [p["page"] for p in eval_data.read_wikitext_pages(path)]
    assert pages == [
        " = Alpha = \n \n Alpha text . \n \n = = Section = = \n \n More . \n ",
        " = Beta = \n \n Beta text . \n \n",
    ]
    sample = eval_data.read_wikitext_pages(SAMPLES / "wikitext-2-raw" / "wiki.test.raw")
    assert [p["page"].split("\n")[0] for p in sample] == [" = Robert Boulter = ", " = Du Fu = "]


# --- a tiny model through real lm-eval -----------------------------------------------------------------------


def test_cpu_auto_batch_is_at_most_8_and_its_logits_fit_an_eighth_of_free_memory():
    from minitron.evaluate import cpu_batch_size

    assert cpu_batch_size(256, 4096) == 8  # the bundled teacher: 8 x 256 x 4096 float32 logits are tiny
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    batch = cpu_batch_size(2048, 128_256)  # Llama-3.1's vocabulary at 2,048 tokens: 3 GB of logits per row
    assert 1 <= batch <= 8 and (batch == 1 or batch * 2048 * 128_256 * 4 * 3 <= free / 8)


def test_gsm8k_fits_a_model_whose_context_is_shorter_than_lm_evals_generation_budget():
    # lm-eval generates up to 256 tokens and keeps max_length - 256 prompt tokens: a 256-token model (the
    # bundled teacher's context) would fail its assertion. Such a model generates at most half its context.
    from minitron.evaluate import evaluate_model

    tok = byte_tokenizer()
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = tiny_model("llama", vocab_size=len(tok), max_position_embeddings=256, **ids).eval()
    results, settings = evaluate_model(model, tok, tasks=["gsm8k"], limit=1, batch_size=1, data_dir=SAMPLES)
    assert settings["max_length"] == 256 and settings["max_gen_toks"] == 128
    assert 0.0 <= results["results"]["gsm8k"]["exact_match,strict-match"] <= 1.0


def test_eval_cli_all_tasks_on_committed_samples(checkpoint, tmp_path):
    out = tmp_path / "results.json"
    result = run("eval", checkpoint, "-o", out, "--data-dir", SAMPLES, "--limit", 2, "--batch-size", 4,
                 "--name", "tiny-student")  # fmt: skip
    assert result.returncode == 0, result.stderr
    data = json.loads(out.read_text())
    # lm-eval's own results JSON is kept whole...
    for key in ("results", "configs", "versions", "n-shot", "n-samples", "config", "lm_eval_version"):
        assert key in data
    assert data["n-shot"]["mmlu_philosophy"] == 5 and data["n-shot"]["gsm8k"] == 5 and data["n-shot"]["hellaswag"] == 0
    results = data["results"]
    assert {"mmlu", "hellaswag", "gsm8k", "wikitext"} <= set(results)
    for metric in ("exact_match,strict-match", "exact_match,flexible-extract"):
        assert 0.0 <= results["gsm8k"][metric] <= 1.0
    assert results["wikitext"]["word_perplexity,none"] > 1.0
    # ...and the mmlu number of a partial run is the question-weighted mean of its subjects.
    subjects = [k for k in results if k.startswith("mmlu_")]
    assert len(subjects) == 3 and results["mmlu"]["sample_len"] == 6
    assert results["mmlu"]["acc,none"] == pytest.approx(sum(results[s]["acc,none"] for s in subjects) / 3)
    section = data["minitron"]
    assert section["format_version"] == 1 and section["tool"] == "minitron"
    assert section["model"]["name"] == "tiny-student"  # the leaderboard's row label, not the folder's name
    assert section["model"]["params"]["total"] == sum(p.numel() for p in tiny_model("llama", vocab_size=259).parameters())
    assert section["lineage"]["pruned_from"] == "/models/tiny-teacher"
    assert section["lineage"]["teacher"] == "/models/tiny-teacher-corrected"  # distilled from wins
    assert section["settings"]["partial"] == {"mmlu": "3/57 subjects"} and section["settings"]["limit"] == 2
    assert section["settings"]["batch_size"] == 4 and section["versions"]["lm_eval"] == lm_eval.__version__
    assert section["timing"]["eval_s"] > 0
    # The summary restates lm-eval's numbers, it does not recompute them.
    summary = section["summary"]
    assert summary["MMLU"]["value"] == results["mmlu"]["acc,none"]
    assert summary["HellaSwag"]["value"] == results["hellaswag"]["acc_norm,none"]
    assert summary["GSM8K flexible"]["value"] == results["gsm8k"]["exact_match,flexible-extract"]
    assert summary["WikiText word ppl"]["value"] == results["wikitext"]["word_perplexity,none"]
    # One rich bar per request type, each run to its total.
    for label in ("answer choices", "generations", "perplexity windows"):
        done = re.search(rf"{label}\s.*?(\d+)/(\d+)", result.stdout)
        assert done and done.group(1) == done.group(2) and int(done.group(1)) > 0, result.stdout
    assert section["settings"]["requests"] == 3 * 2 * 4 + 2 * 4 + 2 + 2
    # The greedy continuations of the fixed prompts, for the report to show side by side.
    assert section["generations"]["decoding"] == "greedy"
    assert [g["prompt"] for g in section["generations"]["samples"]] == list(PROMPTS)


def test_generations_are_greedy_and_fit_the_context():
    tok = byte_tokenizer()
    model = tiny_model("llama", seed=3, vocab_size=len(tok), max_position_embeddings=12, eos_token_id=tok.eos_token_id,
                       bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id).eval()

    def argmax_text(prompt: str, n: int) -> str:  # the argmax token, one at a time, n times or until EOS
        ids = tok(prompt, return_tensors="pt").input_ids
        start = ids.shape[1]
        with torch.no_grad():
            for _ in range(n):
                ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
                if ids[0, -1] == tok.eos_token_id:
                    break
        return tok.decode(ids[0, start:], skip_special_tokens=True)

    [sample] = generate_samples(model, tok, ["abc"], max_new_tokens=5)
    assert sample == {"prompt": "abc", "continuation": argmax_text("abc", 5)}
    # A prompt of 10 tokens in a 12-token context gets at most 2 new tokens, whatever was asked.
    assert len(tok("0123456789").input_ids) == 10
    [long] = generate_samples(model, tok, ["0123456789"], max_new_tokens=5)
    assert long["continuation"] == argmax_text("0123456789", 2)


def test_summary_reads_hub_keys():
    results = {"results": {"hellaswag": {"acc_norm,none": 0.5, "acc_norm_stderr,none": 0.1, "sample_len": 10}}}
    assert summarize(results) == {
        "HellaSwag": {"task": "hellaswag", "key": "acc_norm,none", "value": 0.5, "stderr": 0.1,
                      "higher_is_better": True, "samples": 10}
    }  # fmt: skip


# --- bad input -----------------------------------------------------------------------------------------------


def test_unknown_task_lists_the_known_ones(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    assert_user_error(run("eval", checkpoint, "-o", out, "--tasks", "mmlu,arc"), "'arc'", "mmlu, hellaswag, gsm8k, wikitext")
    assert not out.exists()


def _broken_copy(tmp_path: Path, task: str) -> tuple[Path, str]:
    """A copy of the samples with one file broken on a known line; returns the data dir and 'file:line'."""
    import shutil

    data = tmp_path / "data"
    shutil.copytree(SAMPLES, data)
    if task == "mmlu":
        path = data / "mmlu" / "test" / "philosophy_test.csv"
        lines = path.read_text().splitlines()
        lines[3] = lines[3].rsplit(",", 1)[0] + ",E"
        path.write_text("\n".join(lines) + "\n")
        return data, f"{path}:4"
    if task == "hellaswag":
        path = data / "hellaswag" / "hellaswag_val_full.txt"
        lines = path.read_text().split("\n")
        lines[13] = "7"  # the label line of item 3
        path.write_text("\n".join(lines))
        return data, f"{path}:14"
    path = data / "gsm8k" / "test.jsonl"
    lines = path.read_text().splitlines()
    lines[4] = lines[4][:-3]
    path.write_text("\n".join(lines) + "\n")
    return data, f"{path}:5"


@pytest.mark.parametrize("task", ["mmlu", "hellaswag", "gsm8k"])
def test_malformed_file_names_file_and_line(tmp_path, task):
    data, where = _broken_copy(tmp_path, task)
    with pytest.raises(UserError) as e:
        eval_data.check(data, [task])
    assert where in e.value.line()


def test_bad_data_dir_is_one_line_and_writes_nothing(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    assert_user_error(run("eval", checkpoint, "-o", out, "--data-dir", tmp_path / "nope"), "no such folder")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(run("eval", checkpoint, "-o", out, "--data-dir", empty, "--tasks", "gsm8k"), "gsm8k/test.jsonl", "expected layout")
    data, where = _broken_copy(tmp_path, "mmlu")
    assert_user_error(run("eval", checkpoint, "-o", out, "--data-dir", data), where)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "empty"]  # no results, no temp files


def test_existing_output_refused_before_work(checkpoint, tmp_path):
    out = tmp_path / "r.json"
    out.write_text("{}")
    with pytest.raises(UserError, match="already exists"):
        evaluate(checkpoint, out, data_dir=SAMPLES)
    assert out.read_text() == "{}"


def test_parse_tasks():
    assert parse_tasks("gsm8k, mmlu,gsm8k") == ["gsm8k", "mmlu"]
    with pytest.raises(UserError, match="no tasks"):
        parse_tasks(" , ")


def test_eval_dir_holds_tasks_and_references():
    root = eval_dir()
    assert (root / "references.yaml").is_file()
    assert len(list((root / "tasks" / "mmlu").glob("mmlu_*.yaml"))) == 57

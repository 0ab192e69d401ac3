"""Local copies of the evaluation sets, read into the documents that lm-eval's hub tasks expect.

The task YAMLs in ``eval/tasks/`` name these functions (``custom_dataset: !function
minitron.eval_data.<task>``). lm-eval calls them with the task's metadata, where ``data_dir`` arrives,
plus the task's ``dataset_kwargs``. Each returns a :class:`datasets.DatasetDict` with the split names and
fields of the hub data set that the built-in task reads, so the prompts, few-shot splits and metrics
come from the same templates and functions as the hub tasks.

Every reader checks its file and raises :class:`UserError` naming the file and line of the first
problem; :func:`check` runs them all before a model is loaded.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import re
from pathlib import Path
from typing import Any

from minitron.errors import UserError
from minitron.inputs import read_text, text_lines

# Where each task's files live under --data-dir: the layout of the published copies (see tests/data/eval).
LAYOUT = {
    "mmlu": "mmlu/test/<subject>_test.csv + mmlu/dev/<subject>_dev.csv",
    "hellaswag": "hellaswag/hellaswag_val_full.txt",
    "gsm8k": "gsm8k/test.jsonl + gsm8k/train.jsonl",
    "wikitext": "wikitext-2-raw/wiki.test.raw",
}
# A file under --data-dir whose content is not the published task data.
_REPAIR = "repair it, or copy the published file there again"
MMLU_HEADER = ["question", "choice0", "choice1", "choice2", "choice3", "answer"]


def _root(data_dir: str | Path | None) -> Path:
    if not data_dir:
        raise UserError(
            "no data folder given for a local task",
            fix='pass --data-dir DIR (lm_eval CLI: --metadata \'{"data_dir": "DIR"}\')',
        )
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        what = "a file, not a folder" if root.exists() else "no such folder"
        raise UserError(what, where=f"--data-dir {root}", fix="pass the folder that holds the task folders")
    return root


def _file(root: Path, relative: str, task: str) -> Path:
    path = root / relative
    if not path.is_file():
        raise UserError(f"missing {task} file", where=str(path), fix=f"expected layout under --data-dir: {LAYOUT[task]}")
    return path


def _dataset(splits: dict[str, list[dict]]):
    import datasets

    return datasets.DatasetDict({name: datasets.Dataset.from_list(rows) for name, rows in splits.items()})


# --- MMLU ---------------------------------------------------------------------------------------------------


def mmlu_subjects(data_dir: str | Path) -> list[str]:
    """Subjects that have a test file under ``mmlu/test``, sorted."""
    test_dir = _root(data_dir) / "mmlu" / "test"
    if not test_dir.is_dir():
        raise UserError("missing MMLU folder", where=str(test_dir), fix=f"expected layout: {LAYOUT['mmlu']}")
    subjects = sorted(p.name.removesuffix("_test.csv") for p in test_dir.glob("*_test.csv"))
    if not subjects:
        raise UserError("no <subject>_test.csv files", where=str(test_dir), fix=f"expected layout: {LAYOUT['mmlu']}")
    return subjects


@functools.lru_cache(maxsize=256)
def read_mmlu_csv(path: Path, subject: str) -> tuple[dict, ...]:
    """Rows of one MMLU CSV (header, four choices, 0-based answer) as ``cais/mmlu`` documents."""
    reader = csv.reader(io.StringIO(read_text(path, newlines=False), newline=""))
    header = next(reader, None)
    if header != MMLU_HEADER:
        raise UserError(f"line 1: header is {header}, expected {','.join(MMLU_HEADER)}", where=str(path), fix=_REPAIR)
    docs = []
    for row in reader:
        where = f"{path}:{reader.line_num}"
        if len(row) != 6:
            raise UserError(f"{len(row)} fields, expected 6 (question, 4 choices, answer)", where=where, fix=_REPAIR)
        if row[5] not in ("0", "1", "2", "3"):
            raise UserError(f"answer {row[5]!r} is not 0-3", where=where, fix=_REPAIR)
        docs.append({"question": row[0], "subject": subject, "choices": row[1:5], "answer": int(row[5])})
    if not docs:
        raise UserError("no questions after the header", where=str(path), fix=_REPAIR)
    return tuple(docs)


def mmlu(data_dir: str | None = None, subject: str | None = None, **_: Any):
    """``cais/mmlu`` for one subject: ``test`` (scored) and ``dev`` (the 5 few-shot examples)."""
    root = _root(data_dir)
    return _dataset(
        {
            split: list(read_mmlu_csv(_file(root, f"mmlu/{split}/{subject}_{split}.csv", "mmlu"), subject))
            for split in ("test", "dev")
        }
    )


# --- HellaSwag ----------------------------------------------------------------------------------------------

# The text copy keeps `activity_label: ctx` but not where lm-eval's ctx_a ends and ctx_b begins, and the
# hub task capitalises ctx_b. In ActivityNet items ctx_b is the lower-case sentence start after the last
# sentence end ("... on a roof. he"); WikiHow items have an empty ctx_b. Splitting there lets the hub's own
# process_docs() rebuild the hub prompt ("... on a roof. He").
_LAST_SENTENCE = re.compile(r"^(?P<a>.*[.!?]) (?P<b>[a-z][^.!?]*)$")


@functools.lru_cache(maxsize=8)
def read_hellaswag(path: Path) -> tuple[dict, ...]:
    """HellaSwag's 6-line text layout (context, label, four endings) as ``Rowan/hellaswag`` documents."""
    lines = read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    docs = []
    for start in range(0, len(lines), 6):
        block = lines[start : start + 6]
        where = f"{path}:{start + 1}"
        if len(block) < 6:
            raise UserError(f"last item has {len(block)} lines, expected 6 (context, label, 4 endings)", where=where,
                            fix=_REPAIR)  # fmt: skip
        for offset, line in enumerate(block):
            if not line.strip():
                raise UserError("empty line inside an item (6 lines each: context, label, 4 endings)",
                                where=f"{path}:{start + offset + 1}", fix=_REPAIR)  # fmt: skip
        context, label, *endings = block
        if label not in ("0", "1", "2", "3"):
            raise UserError(f"label {label!r} is not 0-3 (line 2 of an item)", where=f"{path}:{start + 2}", fix=_REPAIR)
        activity, sep, ctx = context.partition(": ")
        if not sep:
            raise UserError("context line has no 'activity: ' prefix", where=where, fix=_REPAIR)
        split = _LAST_SENTENCE.match(ctx) or re.match(r"^(?P<a>)(?P<b>[a-z][^.!?]*)$", ctx)
        ctx_a, ctx_b = (split["a"], split["b"]) if split else (ctx, "")
        docs.append(
            {
                "ind": len(docs),
                "activity_label": activity,
                "ctx_a": ctx_a,
                "ctx_b": ctx_b,
                "ctx": ctx,
                "endings": endings,
                "source_id": "",
                "split": "val",
                "split_type": "",
                "label": label,
            }
        )
    if not docs:
        raise UserError("no items", where=str(path), fix=_REPAIR)
    return tuple(docs)


def hellaswag(data_dir: str | None = None, **_: Any):
    """The validation set; it also serves the few-shot examples, since the train set is not available."""
    docs = read_hellaswag(_file(_root(data_dir), "hellaswag/hellaswag_val_full.txt", "hellaswag"))
    return _dataset({"validation": list(docs)})


# --- GSM8K --------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def read_jsonl(path: Path, fields: tuple[str, ...]) -> tuple[dict, ...]:
    docs = []
    for number, line in text_lines(path):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            doc = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"not valid JSON ({e.msg})", where=where, fix=_REPAIR) from None
        missing = [k for k in fields if not isinstance(doc, dict) or not isinstance(doc.get(k), str)]
        if missing:
            raise UserError(f"no string field {missing[0]!r}", where=where, fix=_REPAIR)
        docs.append({k: doc[k] for k in fields})
    if not docs:
        raise UserError("no rows", where=str(path), fix=_REPAIR)
    return tuple(docs)


def gsm8k(data_dir: str | None = None, **_: Any):
    """``openai/gsm8k`` (config ``main``): ``test`` scored, ``train`` for the few-shot examples."""
    root = _root(data_dir)
    return _dataset(
        {
            split: list(read_jsonl(_file(root, f"gsm8k/{split}.jsonl", "gsm8k"), ("question", "answer")))
            for split in ("test", "train")
        }
    )


# --- WikiText -----------------------------------------------------------------------------------------------


def _is_article_title(line: str) -> bool:
    # " = Title = " starts an article; " = = Section = = " does not.
    text = line.replace("= = =", "===").replace("= =", "==").strip()
    return text.startswith("= ") and text.endswith(" =")


@functools.lru_cache(maxsize=8)
def read_wikitext_pages(path: Path) -> tuple[dict, ...]:
    """Raw WikiText cut into articles like ``EleutherAI/wikitext_document_level``: a page starts at each
    article title line, and keeps its lines joined by ``\\n``; whitespace-only pieces are dropped."""
    # CRLF line endings of the copy become the upstream LF.
    text = read_text(path)
    pages, current = [], []
    for line in text.split("\n"):
        if _is_article_title(line):
            if "".join(current).strip():
                pages.append({"page": "\n".join(current)})
            current = []
        current.append(line)
    if "".join(current).strip():
        pages.append({"page": "\n".join(current)})
    if not pages:
        raise UserError("no text", where=str(path), fix=_REPAIR)
    return tuple(pages)


def wikitext(data_dir: str | None = None, **_: Any):
    """``wikitext-2-raw-v1`` at document level: the ``test`` split (the raw train split is not needed)."""
    path = _file(_root(data_dir), "wikitext-2-raw/wiki.test.raw", "wikitext")
    return _dataset({"test": list(read_wikitext_pages(path))})


LOADERS = {"mmlu": None, "hellaswag": hellaswag, "gsm8k": gsm8k, "wikitext": wikitext}


def check(data_dir: str | Path, tasks: list[str]) -> dict[str, Any]:
    """Read and validate every file the tasks need (cached for the run); returns what was found."""
    found: dict[str, Any] = {}
    for task in tasks:
        if task == "mmlu":
            subjects = mmlu_subjects(data_dir)
            for subject in subjects:
                mmlu(data_dir, subject)
            found["mmlu_subjects"] = subjects
        else:
            LOADERS[task](data_dir)
    return found

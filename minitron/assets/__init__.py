"""Files shipped inside the package: the small teacher, its training text and small evaluation samples.

They let ``minitron quickstart``, the notebooks and the tests run the whole method offline, with no hub
and no GPU. Layout (each data folder has a ``SOURCE.md`` with origin and license)::

    teacher/                      Llama checkpoint + tokenizer + model card (scripts/train_teacher.py)
    data/wikitext-2/              WikiText-2 v1 articles, detokenized: train.jsonl.gz, valid.jsonl.gz
    data/eval/                    samples of MMLU, HellaSwag, GSM8K, WikiText-2 raw in the layout
                                  ``minitron eval --data-dir`` reads (see minitron/eval_data.py)
"""

from __future__ import annotations

import gzip
import json
from importlib import resources
from pathlib import Path

from minitron.errors import UserError


def _asset(*parts: str) -> Path:
    # A regular (non-zipped) install, editable or wheel, gives real paths that transformers can open.
    path = Path(str(resources.files(__name__).joinpath(*parts)))
    if not path.exists():
        raise UserError(
            "bundled file missing from the installed package",
            where=str(path),
            fix="reinstall minitron from a wheel or a full git checkout (pip install --force-reinstall minitron)",
        )
    return path


def teacher_path() -> Path:
    """Folder of the bundled teacher: pass it to ``AutoModelForCausalLM.from_pretrained`` / any verb."""
    return _asset("teacher")


def calibration_text() -> Path:
    """WikiText-2 train articles (``.jsonl.gz``, one ``{"title", "text", "words"}`` record per article):
    the teacher's own training text, used for importance calibration and distillation."""
    return _asset("data", "wikitext-2", "train.jsonl.gz")


def validation_text() -> Path:
    """WikiText-2 valid articles, same format as :func:`calibration_text`."""
    return _asset("data", "wikitext-2", "valid.jsonl.gz")


def eval_data_dir() -> Path:
    """Folder for ``--data-dir`` of the local lm-eval tasks (mmlu/, hellaswag/, gsm8k/, wikitext-2-raw/)."""
    return _asset("data", "eval")


def read_articles(path: Path | None = None) -> list[str]:
    """The ``text`` of every record of a shipped ``.jsonl.gz`` (default: :func:`calibration_text`), in
    file order; a list that ``minitron.data.token_blocks`` accepts as its source."""
    path = calibration_text() if path is None else Path(path)
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f if line.strip()]

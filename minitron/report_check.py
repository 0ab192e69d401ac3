"""The values of a ``minitron eval`` results file that the report shows, checked when the file is read.

A results file is JSON that anyone can edit: a value the tables and plots cannot show (an accuracy of 7, an
infinite perplexity, a score written as a string, a missing timing) is refused here in one line naming the file
and the key, before any output is written, instead of failing half-way through the rendering.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from minitron.errors import UserError
from minitron.evaluate import CHANCE

# What the report shows of each run besides its scores: a file without one is refused when read, not half-way
# through the writing.
REQUIRED = (
    "model.name", "model.path", "model.family", "model.shape", "model.params.total", "settings.shots",
    "settings.tasks", "settings.data", "settings.batch_size", "settings.device", "settings.dtype", "summary",
    "timing.eval_s",
)  # fmt: skip


def _malformed(path: Path, key: str, what: str) -> UserError:
    return UserError(f"minitron.{key} {what}", where=str(path), fix="re-run `minitron eval` to write the file again")


def _number(path: Path, key: str, value: Any, high: float = math.inf) -> None:
    """A finite number in [0, high] (a bool is not a number), else a one-line error naming ``key``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and 0 <= value <= high):
        what = "a fraction in [0, 1]" if high == 1 else "a finite number ≥ 0"
        raise _malformed(path, key, f"is {value!r}, not {what}")


def check_section(section: dict[str, Any], path: Path) -> None:
    """Refuse every value of a ``minitron`` section that the tables and plots could not show: a missing key, a
    score that is not a finite number (accuracies are fractions in [0, 1], perplexities ≥ 0), a count of documents
    that is not a positive whole number, continuations that are not {prompt, continuation} texts."""
    for key in REQUIRED:
        node, parts = section, key.split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                raise _malformed(path, ".".join(parts[: i + 1]), "is missing")
            node = node[part]
    _number(path, "model.params.total", section["model"]["params"]["total"])
    _number(path, "timing.eval_s", section["timing"]["eval_s"])
    if not isinstance(section["summary"], dict):
        raise _malformed(path, "summary", "is not an object of scores")
    for label, score in section["summary"].items():
        key = f"summary.{label}"
        if not isinstance(score, dict):
            raise _malformed(path, key, "is not an object with a value")
        # The accuracies are those with a chance level; lm-eval writes them as fractions, the report shows percent.
        _number(path, f"{key}.value", score.get("value"), high=1 if label in CHANCE else math.inf)
        if score.get("stderr") is not None:
            _number(path, f"{key}.stderr", score["stderr"])
        samples = score.get("samples")
        if samples is not None and (isinstance(samples, bool) or not isinstance(samples, int) or samples < 1):
            raise _malformed(path, f"{key}.samples", f"is {samples!r}, not a positive whole number")
    generations = section.get("generations") or {}  # optional: the report then shows no generated text
    texts = generations.get("samples", []) if isinstance(generations, dict) else None
    if not isinstance(texts, list) or not all(
        isinstance(g, dict) and isinstance(g.get("prompt"), str) and isinstance(g.get("continuation"), str) for g in texts
    ):
        raise _malformed(path, "generations.samples", "is not a list of {prompt, continuation} texts")

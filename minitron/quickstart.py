"""``minitron quickstart``: the whole Minitron method on the bundled teacher, on a CPU, in minutes.

importance → prune to half the parameters by width → distill → evaluate teacher and both students → report.

Every stage calls the function its full-size verb calls, with the settings a user would pass:

============ ====================================================================================
importance   ``importance.run`` (``minitron importance``) on the shipped WikiText-2 train articles
prune        ``search.prune_to_target`` (``minitron prune --target 0.5x --axes width --scores …
             --calib …``): width shapes at half the parameters, ranked by held-out loss
distill      ``distill.train`` (``minitron distill``) with a :class:`~minitron.recipe.Recipe` validated
             by the same schema as ``recipes/*.yaml``; the resolved recipe is saved in ``distill/``
eval         ``evaluate.evaluate`` (``minitron eval --data-dir``) on the shipped samples of MMLU,
             HellaSwag, GSM8K and the WikiText-2 raw test set
report       ``report.write_report`` (``minitron report``)
============ ====================================================================================

Only the sizes are small: calibration blocks, distillation steps and ``--limit`` of the evaluation. The
defaults are chosen to finish in under ten minutes on a 2-core CPU while letting distillation recover most
of what pruning lost (measured numbers: README.md and the report of this stage's author).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from minitron.errors import UserError

DEFAULT_OUT = Path("minitron-quickstart")
MODELS = ("teacher", "pruned", "distilled")
LABELS = {"teacher": "teacher", "pruned": "pruned, before KD", "distilled": "distilled"}
WIKITEXT = "WikiText word ppl"


@dataclass(frozen=True)
class Settings:
    """The knobs of a quickstart run; everything else is the full-size verbs' defaults."""

    steps: int = 200
    """Distillation steps (optimizer steps of ``batch`` blocks of ``seq_len`` tokens)."""
    eval_limit: int = 20
    """Documents per evaluation task (lm-eval ``--limit``): articles for WikiText, questions for the rest."""
    samples: int = 128
    """Calibration blocks for importance."""
    max_ffn_cut: float = 0.6
    """Largest share of the MLP neurons the search may remove (``--limit ffn=…``). At the default 0.5 the
    search finds four shapes at half the parameters (hidden 160-220, MLP 768-384); 0.6 adds the one with the
    most embedding channels, hidden 240 / MLP 320, and the held-out loss decides (it ranks first on the
    bundled teacher: 5.076 against 5.417 for the best of the four right after pruning, and after distillation
    4.189 against 4.204 on 512 held-out blocks, 0.015 ± 0.002 lower paired by seed;
    ``benchmarks/results/peers_prune_bundled_512.md``)."""
    heldout: int = 32
    """Held-out blocks that rank the candidates (``--heldout-samples``)."""
    seq_len: int = 256
    """Tokens per block everywhere: the bundled teacher's context length."""
    batch: int = 8
    """Blocks per distillation step (one micro-batch: no accumulation needed at this size)."""
    lr: float = 2e-3
    """Peak learning rate. Far above the paper's 1e-4 for 8B models: a 5M-parameter student with a few
    hundred steps needs large steps to recover, and the short cosine decay keeps it stable."""
    tasks: str = "mmlu,hellaswag,gsm8k,wikitext"
    """Evaluation tasks (``minitron eval --tasks``). GSM8K's 5-shot prompts (~800 tokens) are cut to the
    bundled teacher's 256-token context like any too-long prompt; a 10M-parameter model trained on Wikipedia
    text scores 0 there, which the leaderboard shows as it is."""
    seed: int = 0

    def check(self) -> None:
        from minitron.evaluate import parse_tasks

        for name, value in asdict(self).items():
            if isinstance(value, (int, float)) and name != "seed" and value <= 0:
                raise UserError(f"must be positive, got {value}", where=f"--{name.replace('_', '-')}")
        parse_tasks(self.tasks)  # a typo in --tasks is refused now, not after an hour of distillation


# Held-out blocks of the distillation, scored before the first step and after the last.
EVAL_BLOCKS = 16


def check_batch(teacher: Path, text: Path, s: Settings) -> None:
    """Refuse ``--batch`` beyond the blocks the distillation text packs into, before any stage runs. The
    text is tokenized into distill's cache, where the distillation stage finds it (a few seconds, not extra)."""
    from minitron.distill_data import Blocks, init_world, packed_blocks
    from minitron.inputs import load_tokenizer
    from minitron.recipe import Data

    blocks = packed_blocks(Data(source=str(text), seq_len=s.seq_len), load_tokenizer(teacher), init_world())
    try:
        Blocks(blocks, heldout=EVAL_BLOCKS, seed=s.seed).check_batch(s.batch)
    except UserError as e:
        raise UserError(e.what, where="--batch", fix=f"pass --batch {len(blocks) - EVAL_BLOCKS} or less") from None


@dataclass(frozen=True)
class Layout:
    """Where each stage writes inside the output folder."""

    root: Path

    @property
    def scores(self) -> Path:
        return self.root / "scores.safetensors"

    @property
    def pruned(self) -> Path:
        return self.root / "pruned"

    @property
    def distill_run(self) -> Path:
        """The distillation run folder (resolved recipe, metrics.jsonl); its ``final/`` becomes ``distilled``."""
        return self.root / "distill"

    @property
    def distilled(self) -> Path:
        return self.root / "distilled"

    def results(self, model: str) -> Path:
        return self.root / "results" / f"{model}.json"

    @property
    def leaderboard(self) -> Path:
        return self.root / "leaderboard"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"


# --- the data -------------------------------------------------------------------------------------------------


def training_text(cache: Path | None = None) -> Path:
    """The shipped WikiText-2 train articles as a ``.jsonl`` file that every stage's reader accepts.

    The package ships them gzip-compressed (``minitron.assets.calibration_text()``); the loaders of
    :mod:`minitron.data` read plain ``.jsonl``. The file is written once per asset content into the minitron
    cache (``$MINITRON_CACHE``, default ``~/.cache/minitron``), so that distillation's token cache, keyed on
    the file, is reused by later runs.
    """
    from minitron import assets
    from minitron.artifacts import atomic_file

    source = assets.calibration_text()
    digest = hashlib.sha256(source.read_bytes()).hexdigest()[:16]
    root = cache or Path(os.environ.get("MINITRON_CACHE", "~/.cache/minitron")).expanduser()
    path = root / "assets" / f"wikitext-2-train-{digest}.jsonl"
    if not path.is_file():
        with atomic_file(path, overwrite=True) as tmp, gzip.open(source, "rt", encoding="utf-8") as f:
            with tmp.open("w", encoding="utf-8") as out:
                for line in f:
                    if line.strip():
                        out.write(json.dumps({"text": json.loads(line)["text"]}, ensure_ascii=False) + "\n")
    return path


# --- the output folder ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def output_folder(out: Path, overwrite: bool) -> Iterator[Path]:
    """A temporary sibling of ``out`` to build in, renamed onto ``out`` when the body ends without error, and
    removed if it fails or is interrupted (:func:`~minitron.artifacts.atomic_dir`).

    The stages record paths in what they write (model cards, the distillation recipe, results lineage), and
    while the run lasts those name the temporary folder. Just before the rename they are rewritten to name
    ``out``: the sibling's name (``.<name>.tmp-<pid>-<host>-<random>``) occurs nowhere else, so replacing it
    in the text files cannot touch anything but those paths.
    """
    from minitron.artifacts import atomic_dir

    with atomic_dir(out, overwrite) as tmp:
        yield tmp
        for path in tmp.rglob("*"):
            if path.suffix in _TEXT_SUFFIXES and path.is_file():
                text = path.read_text(encoding="utf-8")
                if tmp.name in text:
                    path.write_text(text.replace(tmp.name, out.name), encoding="utf-8")


_TEXT_SUFFIXES = (".json", ".jsonl", ".yaml", ".md", ".html")


@contextlib.contextmanager
def _library_bars_off() -> Iterator[None]:
    """transformers draws tqdm bars when it loads and saves weights; the quickstart shows rich bars only."""
    from transformers.utils import logging as hf_logging

    enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            hf_logging.enable_progress_bar()


# --- the stages -----------------------------------------------------------------------------------------------


def importance_stage(teacher: Path, text: Path, layout: Layout, s: Settings, show: bool) -> dict[str, Any]:
    """``minitron importance TEACHER --calib TEXT --samples N --seq-len 256 -o scores.safetensors``."""
    from minitron import importance

    _, info = importance.run(
        str(teacher), str(text), layout.scores, samples=s.samples, seq_len=s.seq_len, batch_size=8, seed=s.seed,
        show_progress=show,
    )  # fmt: skip
    return {"scores": str(layout.scores), "tokens": info["tokens"], "mode": info["mode"]}


def prune_stage(teacher: Path, text: Path, layout: Layout, s: Settings, show: bool, command: str) -> dict[str, Any]:
    """``minitron prune TEACHER --target 0.5x --axes width --limit ffn=0.6 --scores scores.safetensors
    --calib TEXT -o pruned``: every width shape within 2 % of half the teacher, ranked by held-out LM loss
    right after pruning, the best one written."""
    from minitron import search
    from minitron.families import Shape
    from minitron.inputs import load_config
    from minitron.prune import Calibration

    shape = Shape.from_config(load_config(teacher))
    info = search.prune_to_target(
        str(teacher), shape, target="0.5x", active_target=None, axes="width", prune_heads=False,
        tolerance=None, limits=(f"ffn={s.max_ffn_cut}",), dry_run=False, out=layout.pruned, drop_layers=None,
        ranking=search.Ranking(heldout_samples=s.heldout), scores_file=layout.scores,
        calibration=Calibration(str(text), s.samples, s.seq_len, batch_size=8, seed=s.seed),
        overwrite=False, trust_remote_code=False, command=command, show_progress=show,
    )  # fmt: skip
    ranked = sorted((c for c in info["search"]["candidates"] if "rank" in c), key=lambda c: c["rank"])
    return {
        "shape": info["student"]["shape"],
        "params": info["student"]["params"]["total"],
        "teacher_params": info["teacher"]["params"]["total"],
        "ranked": [{k: c[k] for k in ("hidden", "ffn", "params", "score")} for c in ranked],
    }


def distill_recipe(teacher: Path, text: Path, layout: Layout, s: Settings):
    """The distillation recipe, validated by the schema of ``recipes/*.yaml`` (saved as ``distill/recipe.yaml``).

    Minitron's loss (forward KL on logits, τ = 1, no LM loss), its optimizer (AdamW, linear warm-up, cosine
    decay to a tenth) and its data (the teacher's own training text); only the scale differs.
    """
    from minitron.recipe import validate

    data = {
        "teacher": {"path": str(teacher)},
        "student": {"path": str(layout.pruned)},
        "data": {"source": str(text), "seq_len": s.seq_len},
        "loss": {"kd": 1.0, "temperature": 1.0, "lm": 0.0},
        "optimizer": {
            "lr": s.lr, "min_lr": s.lr / 10, "warmup_steps": min(20, max(1, s.steps // 10)),
            "weight_decay": 0.0, "grad_clip": 1.0,
        },
        "batch": {"micro": s.batch, "global": s.batch},
        "budget": {"steps": s.steps},
        # float32 on a CPU: bf16 autocast there is slower and gains nothing at this size.
        "precision": "fp32",
        # Held-out blocks, scored before the first and after the last step: the recovery the summary shows.
        "eval": {"every": 0, "blocks": EVAL_BLOCKS},
        "checkpoint": {"every": 0},
        "output": {"dir": str(layout.distill_run)},
        "seed": s.seed,
    }  # fmt: skip
    return validate(data, where="quickstart recipe")


def distill_stage(teacher: Path, text: Path, layout: Layout, s: Settings, command: str) -> dict[str, Any]:
    """``minitron distill RECIPE``, then the final model moves to ``distilled/``."""
    from minitron import distill
    from minitron.distill_state import METRICS

    recipe = distill_recipe(teacher, text, layout, s)
    final = distill.train(recipe, command=command)
    os.replace(final, layout.distilled)
    records = [json.loads(x) for x in (layout.distill_run / METRICS).read_text().splitlines() if x.strip()]
    evals = [r for r in records if "eval_lm" in r]
    return {
        "steps": s.steps,
        "tokens": s.steps * s.batch * s.seq_len,
        "heldout_lm_before": evals[0]["eval_lm"],
        "heldout_lm_after": evals[-1]["eval_lm"],
        "heldout_kl_before": evals[0]["eval_kl"],
        "heldout_kl_after": evals[-1]["eval_kl"],
    }


def eval_stage(models: dict[str, Path], layout: Layout, s: Settings, say: Callable[[str], None]) -> dict[str, Any]:
    """``minitron eval MODEL --data-dir <shipped samples> --limit N -o results/<name>.json`` for each model."""
    from minitron import assets
    from minitron.evaluate import evaluate

    found = {}
    for name, path in models.items():
        say(f"{LABELS[name]}: {path}")
        results = evaluate(
            path, layout.results(name), tasks=s.tasks, limit=s.eval_limit, data_dir=assets.eval_data_dir()
        )
        section = results["minitron"]
        found[name] = {
            "path": str(path),
            "params": section["model"]["params"]["total"],
            "results": str(layout.results(name)),
            "scores": {label: row["value"] for label, row in section["summary"].items()},
        }
    return found


def report_stage(layout: Layout) -> dict[str, str]:
    """``minitron report results/*.json -o leaderboard --no-references``: the published rows are of 8B-class
    models, nothing a 10M-parameter teacher should be set beside."""
    from minitron.report import write_report

    out = write_report([layout.results(m) for m in MODELS], layout.leaderboard, references=False)
    return {"markdown": str(out / "leaderboard.md"), "html": str(out / "leaderboard.html")}


# --- the run --------------------------------------------------------------------------------------------------


def run(
    out: str | Path = DEFAULT_OUT,
    *,
    overwrite: bool = False,
    settings: Settings | None = None,
    teacher: str | Path | None = None,
    show_progress: bool = True,
    command: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Run the whole pipeline into ``out``; returns (and writes as ``out/summary.json``) the summary.

    ``overrides`` are :class:`Settings` fields, e.g. ``run("qs", steps=60, eval_limit=4)``. ``teacher``
    defaults to the bundled one. ``out`` is refused if it exists (unless ``overwrite``) or cannot be written,
    before any work; it is built in a temporary sibling renamed onto ``out`` at the end, so a failed or
    interrupted run leaves no half-written folder behind (and an overwritten one stays whole until then).
    """
    from rich.console import Console

    from minitron import assets
    from minitron.artifacts import check_output_dir
    from minitron.inputs import read_config

    try:
        s = Settings(**{**asdict(settings or Settings()), **overrides})
    except TypeError as e:
        raise UserError(f"unknown setting ({e})", fix=f"use fields of Settings: {', '.join(asdict(Settings()))}") from None
    s.check()
    teacher = Path(teacher) if teacher is not None else assets.teacher_path()
    out = check_output_dir(out, overwrite, inputs=[("the teacher", teacher)])
    read_config(teacher)
    check_batch(teacher, training_text(), s)
    command = command or f"minitron.quickstart.run({str(out)!r})"
    console = Console(quiet=not show_progress)
    timings: dict[str, float] = {}

    def stage(number: int, name: str, what: str, work: Callable[[], Any]) -> Any:
        console.rule(f"[bold]{number}/5 {name}[/] — {what}", align="left")
        started = time.perf_counter()
        result = work()
        timings[name] = round(time.perf_counter() - started, 1)
        console.print(f"[dim]{name} took {timings[name]:.0f} s[/]")
        return result

    started = time.perf_counter()
    with output_folder(out, overwrite) as root, _library_bars_off():
        layout = Layout(root)
        text = training_text()
        record: dict[str, Any] = {"out": str(root), "teacher": str(teacher), "settings": asdict(s)}
        record["importance"] = stage(1, "importance", f"{s.samples} blocks of WikiText-2 train text",
                                     lambda: importance_stage(teacher, text, layout, s, show_progress))
        console.print(f"scores → {layout.scores}")
        record["prune"] = stage(2, "prune", "search width shapes with half the parameters (--target 0.5x --axes width)",
                                lambda: prune_stage(teacher, text, layout, s, show_progress, command))
        console.print(_shape_line(record["prune"]) + f" → {layout.pruned}")
        record["distill"] = stage(3, "distill", f"{s.steps} steps of logit distillation from the teacher",
                                  lambda: distill_stage(teacher, text, layout, s, command))
        d = record["distill"]
        console.print(f"held-out LM loss {d['heldout_lm_before']:.3f} → {d['heldout_lm_after']:.3f}, "
                      f"KL to the teacher {d['heldout_kl_before']:.3f} → {d['heldout_kl_after']:.3f} → {layout.distilled}")
        models = {"teacher": teacher, "pruned": layout.pruned, "distilled": layout.distilled}
        record["models"] = stage(4, "eval", f"{s.tasks} (--limit {s.eval_limit}) of 3 models",
                                 lambda: eval_stage(models, layout, s, console.print))
        record["leaderboard"] = stage(5, "report", "leaderboard Markdown + HTML", lambda: report_stage(layout))
        timings["total"] = round(time.perf_counter() - started, 1)
        record["seconds"] = timings
        # The paths as they will be after the rename (output_folder rewrites those in the files alike).
        record = json.loads(json.dumps(record).replace(root.name, out.name))
        layout.summary.write_text(json.dumps(record, indent=2) + "\n")
    for line in summary_lines(record):
        console.print(line, highlight=False)
    return record


def _shape_line(pruned: dict[str, Any]) -> str:
    from minitron.report_console import human

    shape = pruned["shape"]
    share = pruned["params"] / pruned["teacher_params"]
    others = "; ".join(f"hidden {c['hidden']}, ffn {c['ffn']}: {c['score']:.3f}" for c in pruned["ranked"][1:])
    return (f"hidden {shape['hidden']}, ffn {shape['ffn']}: {human(pruned['params'])} params ({share:.0%} of the teacher), "
            f"held-out loss {pruned['ranked'][0]['score']:.3f}" + (f" (beat {others})" if others else ""))


def summary_lines(record: dict[str, Any]) -> list[str]:
    """Where the leaderboard is, then one line per model: parameters and WikiText word perplexity."""
    from minitron.report_console import human

    lines = [f"leaderboard: {record['leaderboard']['html']} (and leaderboard.md beside it)"]
    for name in MODELS:
        model = record["models"][name]
        ppl = model["scores"].get(WIKITEXT)
        lines.append(f"{LABELS[name]:>17}: {human(model['params']):>7} params, WikiText word perplexity "
                     f"{'n/a' if ppl is None else f'{ppl:,.1f}'}")
    return lines

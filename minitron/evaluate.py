"""``minitron eval``: MMLU, HellaSwag, GSM8K and WikiText through lm-eval, on a model held in memory.

The standard settings people compare against are fixed here, once: MMLU 5-shot accuracy, HellaSwag
``acc_norm`` (0-shot by default, 10-shot as in the Minitron and Open LLM Leaderboard tables), GSM8K 5-shot
exact match after the strict and the flexible answer filters, WikiText word / byte perplexity.

Tasks come from lm-eval's own task set (hub data), or with ``--data-dir`` from the task YAMLs in
``eval/tasks`` that read local copies of the same data (see :mod:`minitron.eval_data`). The results file is
lm-eval's own results JSON, untouched, plus a ``minitron`` section: lineage, parameter counts, settings,
versions, timing and the headline numbers that ``minitron report`` reads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from minitron.errors import UserError

FORMAT_VERSION = 1
TOOL = "minitron"


@dataclass(frozen=True)
class Headline:
    """One number a task is known by: the lm-eval result key, a label, and whether higher is better."""

    key: str
    label: str
    higher_is_better: bool = True


# Shots and headline metrics of each supported task (the keys of lm-eval's results["results"][task]).
TASKS: dict[str, tuple[int, tuple[Headline, ...]]] = {
    "mmlu": (5, (Headline("acc,none", "MMLU"),)),
    "hellaswag": (0, (Headline("acc_norm,none", "HellaSwag"),)),
    "gsm8k": (
        5,
        (
            Headline("exact_match,strict-match", "GSM8K"),
            Headline("exact_match,flexible-extract", "GSM8K flexible"),
        ),
    ),
    "wikitext": (
        0,
        (
            Headline("word_perplexity,none", "WikiText word ppl", higher_is_better=False),
            Headline("byte_perplexity,none", "WikiText byte ppl", higher_is_better=False),
        ),
    ),
}
HELLASWAG_SHOTS = (0, 10)
# What a model that guesses scores on each accuracy (percent): four answer choices, or an exact number.
CHANCE = {"MMLU": 25.0, "HellaSwag": 25.0, "GSM8K": 0.0, "GSM8K flexible": 0.0}
# The prompts whose greedy continuations the leaderboard shows side by side: benchmark accuracies of a small
# model sit at chance, its text shows what pruning broke and distillation restored. Plain encyclopedic
# openings, as in the bundled teacher's WikiText-2 training text.
PROMPTS = (
    "The history of the city",
    "In the early years of the war ,",
    "The album was released",
    "The species is found in",
)
GENERATED_TOKENS = 32
DTYPES = ("auto", "float32", "bfloat16", "float16")


def eval_dir() -> Path:
    """The ``eval/`` folder (task YAMLs and published references).

    It lives at the repository root, and ``minitron/eval_tasks`` is a symlink to it: an editable install
    reads it through the link, and a wheel build copies the linked files into the package (the
    ``eval_tasks/**/*`` package data), so ``importlib.resources`` finds it either way.
    """
    path = Path(str(resources.files("minitron") / "eval_tasks"))
    if not (path / "tasks").is_dir():
        raise UserError("minitron's eval/ folder is missing from this installation", where=str(path),
                        fix="reinstall minitron (pip install -e . from the repository)")
    return path


def parse_tasks(text: str | list[str]) -> list[str]:
    names = [t.strip() for t in (text.split(",") if isinstance(text, str) else text) if t.strip()]
    unknown = [t for t in names if t not in TASKS]
    if unknown or not names:
        raise UserError(
            f"unknown task {unknown[0]!r}" if unknown else "no tasks given",
            where="--tasks",
            fix=f"choose from: {', '.join(TASKS)}",
        )
    return list(dict.fromkeys(names))


def check_shots(hellaswag_shots: int) -> None:
    if hellaswag_shots not in HELLASWAG_SHOTS:
        raise UserError(f"{hellaswag_shots} shots", where="--hellaswag-shots", fix="use 0 or 10")


def parse_batch_size(text: str | int) -> str | int:
    if str(text) == "auto":
        return "auto"
    if str(text).isdigit() and int(text) > 0:
        return int(text)
    raise UserError(f"batch size {text!r} is not a positive number or 'auto'", where="--batch-size")


# --- the model, lm-eval's view of it, and the progress bar --------------------------------------------------


def _resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", where=f"--device {device}", fix="use --device cpu")
    if not re.fullmatch(r"cpu|cuda(:\d+)?|mps", device):
        raise UserError(f"unknown device {device!r}", where="--device", fix="use auto, cpu, cuda or cuda:N")
    return device


def _resolve_dtype(dtype: str, device: str):
    import torch

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}", where="--dtype", fix=f"choose from: {', '.join(DTYPES)}")
    if dtype == "auto":
        # bf16 halves memory and is what the models are trained in; CPUs without bf16 units run it slowly.
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, dtype)


def cpu_batch_size(max_length: int, vocab: int) -> int:
    """``--batch-size auto`` on CPU: lm-eval's probe halves the batch on CUDA out-of-memory errors, which a
    CPU never raises (the process is killed instead), and its 64 × max-length trial passes are slow there.
    Take the largest batch, up to 8, whose float32 logits fit in an eighth of the free memory. Beyond 8 a CPU
    gains no arithmetic efficiency (a batch of prompts is already thousands of rows) and pads more: on the
    2-core build machine a 3M-parameter Llama ran the four tasks (``--limit 8``) in 25.5 / 25.9 / 27.6 /
    27.0 s of evaluation at batch 4 / 8 / 16 / 2 (see benchmarks/eval_overhead.py)."""
    import os

    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    per_sequence = max_length * vocab * 4 * 3  # logits, their log-softmax, and a gathered copy
    return max(1, min(8, free // 8 // per_sequence))


def load_model(
    model: str | Path, *, device: str, dtype: str, tokenizer: str | None, vocab: int, trust_remote_code: bool
):
    """The checkpoint and its tokenizer (refused if it has more tokens than ``vocab``), on ``device``, in eval mode."""
    from minitron.inputs import load_model as load_weights
    from minitron.inputs import load_tokenizer

    torch_dtype = _resolve_dtype(dtype, device)
    tok = load_tokenizer(
        tokenizer or str(model), trust_remote_code=trust_remote_code,
        fix="save the tokenizer beside the checkpoint, or pass --tokenizer PATH_OR_HUB_ID",
        vocab=vocab,
    )  # fmt: skip
    lm = load_weights(model, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return lm.to(device).eval(), tok


def _progress_lm_class():
    """lm-eval's ``HFLM`` reporting to one rich bar per request type instead of its tqdm bars.

    Made on first use so that importing this module does not import lm-eval. Finished requests are counted
    through lm-eval's cache hook, which it calls once per answered request; perplexity requests are long
    documents cut into windows, so those are counted in windows as each batch of windows finishes.
    """
    from lm_eval.api.model import CacheHook
    from lm_eval.models.huggingface import HFLM
    from lm_eval.utils import get_rolling_token_windows

    class _Tick(CacheHook):
        def __init__(self, lm):
            super().__init__(None)
            self.lm = lm

        def add_partial(self, attr, req, res) -> None:
            if attr == self.lm.counting:
                self.lm.advance(1)

    class ProgressHFLM(HFLM):
        def __init__(self, *args, progress, **kwargs):
            super().__init__(*args, **kwargs)
            self.progress, self.counting, self.bar, self.requests_done = progress, None, None, 0
            self.set_cache_hook(_Tick(self))

        @property
        def max_gen_toks(self) -> int:
            # lm-eval generates up to 256 tokens and keeps the last max_length - 256 tokens of the prompt, so a
            # model with a context of 256 (the bundled teacher) fails its assertion and one of 300 would see a
            # 44-token prompt. Such a model generates at most half its context; others are left as lm-eval has it.
            return min(super().max_gen_toks, self.max_length // 2)

        def advance(self, n: int) -> None:
            self.progress.advance(self.bar, n)

        @contextlib.contextmanager
        def _stage(self, counting: str, label: str, total: int):
            self.counting, self.bar = counting, self.progress.add_task(label, total=total)
            try:
                yield
            finally:
                self.counting = None

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            with self._stage("loglikelihood", "answer choices", len(requests)):
                out = super().loglikelihood(requests, disable_tqdm=True)
            self.requests_done += len(requests)
            return out

        def generate_until(self, requests, disable_tqdm: bool = False):
            with self._stage("generate_until", "generations", len(requests)):
                out = super().generate_until(requests, disable_tqdm=True)
            self.requests_done += len(requests)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
            windows = sum(
                sum(1 for _ in get_rolling_token_windows(self.tok_encode(r.args[0]), self.prefix_token_id, self.max_length, 1))
                for r in requests
            )
            with self._stage("windows", "perplexity windows", windows):
                out = super().loglikelihood_rolling(requests, disable_tqdm=True)
            self.requests_done += len(requests)
            return out

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
            out = super()._loglikelihood_tokens(requests, disable_tqdm=True, override_bs=override_bs)
            if self.counting == "windows":
                self.advance(len(requests))
            return out

    return ProgressHFLM


# --- tasks --------------------------------------------------------------------------------------------------


def _load_tasks(tasks: list[str], shots: dict[str, int], data_dir: Path | None, found: dict[str, Any]):
    """lm-eval Task / Group objects for ``tasks``, with the standard number of shots set on every task."""
    from lm_eval.api.group import Group
    from lm_eval.tasks import TaskManager

    if data_dir is None:
        manager = TaskManager()
    else:
        # Only our local tasks are indexed: they carry the hub names, and skipping lm-eval's thousands of
        # YAMLs keeps start-up short.
        manager = TaskManager(
            include_path=str(eval_dir() / "tasks"), include_defaults=False, metadata={"data_dir": str(data_dir)}
        )
    specs: list[Any] = []
    for name in tasks:
        subjects = found.get("mmlu_subjects")
        if name == "mmlu" and subjects is not None and len(subjects) < 57:
            # A partial MMLU: one flat group over the subjects present, averaged over questions like the
            # full group (which nests four weighted-by-size category groups, so the overall number agrees).
            group = Group.from_config({"group": "mmlu", "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}],
                                       "metadata": {"version": 2, "partial": f"{len(subjects)}/57 subjects"}})
            for task in manager.load([f"mmlu_{s}" for s in subjects])["tasks"].values():
                group.add(task)
            specs.append(group)
        else:
            specs.append(name)
    try:
        loaded = manager.load(specs)
    except (ConnectionError, OSError, ValueError) as e:  # the hub datasets are not reachable / cached
        raise UserError(
            f"cannot load the hub data of {', '.join(tasks)} ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
            fix="run with network access once (HF cache), or pass --data-dir DIR with local copies",
        ) from None
    for task_name, task in loaded["tasks"].items():
        family = next(t for t in tasks if task_name == t or task_name.startswith(f"{t}_"))
        task.set_config(key="num_fewshot", value=shots[family])
    by_name = {**loaded.get("groups", {}), **loaded["tasks"]}
    return manager, [spec if not isinstance(spec, str) else by_name[spec] for spec in specs]


def summarize(results: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The headline numbers of each task in lm-eval's results (value, stderr, samples)."""
    table = results.get("results", {})
    summary: dict[str, dict[str, Any]] = {}
    for task, (_, headlines) in TASKS.items():
        row = table.get(task)
        if not row:
            continue
        for h in headlines:
            if h.key in row:
                metric, _, flt = h.key.partition(",")
                stderr = row.get(f"{metric}_stderr,{flt}")
                summary[h.label] = {
                    "task": task,
                    "key": h.key,
                    "value": float(row[h.key]),
                    "stderr": float(stderr) if isinstance(stderr, (int, float)) else None,
                    "higher_is_better": h.higher_is_better,
                    "samples": row.get("sample_len"),
                }
    return summary


def generate_samples(model, tokenizer, prompts=PROMPTS, max_new_tokens: int = GENERATED_TOKENS) -> list[dict[str, str]]:
    """Each prompt's greedy continuation (at most ``max_new_tokens``, fewer where the context is shorter)."""
    import torch

    context = getattr(model.config, "max_position_embeddings", None) or 2048
    eos = tokenizer.eos_token_id
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(model.device)
        budget = max(0, min(max_new_tokens, context - ids.shape[1]))
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=budget, do_sample=False,
                                 num_beams=1, top_p=None, top_k=None, temperature=None,
                                 pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos)
        text = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        samples.append({"prompt": prompt, "continuation": text})
    return samples


@contextlib.contextmanager
def _quiet_libraries(verbose: bool):
    """lm-eval logs a warning per task and datasets a bar per map(); the rich bar says what matters."""
    import datasets

    if verbose:
        yield
        return
    logger = logging.getLogger("lm_eval")
    level, bars = logger.level, datasets.is_progress_bar_enabled()
    logger.setLevel(logging.ERROR)
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        logger.setLevel(level)
        if bars:
            datasets.enable_progress_bars()


def evaluate_model(
    model,
    tokenizer,
    *,
    tasks: list[str],
    limit: int | None = None,
    batch_size: str | int = "auto",
    data_dir: str | Path | None = None,
    hellaswag_shots: int = 0,
    verbose: bool = False,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run lm-eval on an in-memory model; returns lm-eval's results dict and the settings used."""
    from lm_eval import simple_evaluate

    from minitron import eval_data
    from minitron.report_console import progress

    tasks = parse_tasks(tasks)
    check_shots(hellaswag_shots)
    shots = {name: TASKS[name][0] for name in tasks} | ({"hellaswag": hellaswag_shots} if "hellaswag" in tasks else {})
    found = eval_data.check(data_dir, tasks) if data_dir is not None else {}
    device = str(model.device)
    if batch_size == "auto" and not device.startswith("cuda"):
        max_length = getattr(model.config, "max_position_embeddings", 2048) or 2048
        batch_size = cpu_batch_size(min(max_length, 2048), model.config.vocab_size)
    with _quiet_libraries(verbose), progress() as bar:
        lm = _progress_lm_class()(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, progress=bar)
        manager, specs = _load_tasks(tasks, shots, Path(data_dir) if data_dir else None, found)
        results = simple_evaluate(
            model=lm, tasks=specs, task_manager=manager, limit=limit, log_samples=False
        )
    settings = {
        "tasks": tasks,
        "shots": shots,
        "limit": limit,
        "batch_size": batch_size,
        "data": f"local: {Path(data_dir).resolve()}" if data_dir else "hub",
        "requests": lm.requests_done,
    }
    if "gsm8k" in tasks:
        settings["max_gen_toks"] = lm.max_gen_toks
        settings["max_length"] = lm.max_length
    if "mmlu_subjects" in found and len(found["mmlu_subjects"]) < 57:
        settings["partial"] = {"mmlu": f"{len(found['mmlu_subjects'])}/57 subjects"}
    return results, settings


def summary_table(section: dict[str, Any]):
    """The headline numbers of one run as a rich table, for the terminal."""
    from rich.table import Table

    from minitron.report_console import human

    model, settings = section["model"], section["settings"]
    title = f"{model['name']} ({model['family']}, {human(model['params']['total'])} params)"
    table = Table(title=title, title_justify="left")
    for column in ("task", "metric", "value", "± stderr", "shots", "samples"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for label, row in section["summary"].items():
        value, stderr = row["value"], row["stderr"]
        scale = 100 if row["higher_is_better"] else 1  # accuracies in %, perplexities as they are
        table.add_row(
            label,
            row["key"],
            f"{value * scale:.2f}",
            f"{stderr * scale:.2f}" if stderr is not None else "",
            str(settings["shots"][row["task"]]),
            str(row["samples"] or ""),
        )
    if settings.get("limit"):
        table.caption = f"--limit {settings['limit']}: a quick check, not comparable with published numbers"
    return table


def evaluate(
    model: str | Path,
    out: str | Path,
    *,
    tasks: str | list[str] = "mmlu,hellaswag,gsm8k,wikitext",
    limit: int | None = None,
    batch_size: str | int = "auto",
    data_dir: str | Path | None = None,
    hellaswag_shots: int = 0,
    device: str = "auto",
    dtype: str = "auto",
    tokenizer: str | None = None,
    trust_remote_code: bool = False,
    overwrite: bool = False,
    verbose: bool = False,
    name: str | None = None,
    prompts: tuple[str, ...] | list[str] = PROMPTS,
) -> dict[str, Any]:
    """Evaluate a checkpoint and write ``out`` (lm-eval's results JSON + a ``minitron`` section).

    ``name`` labels the model's row in ``minitron report`` (default: the checkpoint folder's name);
    ``prompts`` are continued greedily and recorded (``generations``) for the report to show side by side."""
    from minitron import eval_data
    from minitron.artifacts import atomic_file, check_output_dir, versions
    from minitron.families import Shape
    from minitron.inputs import check_weights, is_local, load_config
    from minitron.model_card import read_lineage

    started = time.perf_counter()
    # Everything that can be wrong with the input is found before the model is loaded.
    task_list = parse_tasks(tasks)
    batch_size = parse_batch_size(batch_size)
    if limit is not None and limit < 1:
        raise UserError(f"limit {limit}", where="--limit", fix="pass a positive number of documents per task")
    check_shots(hellaswag_shots)
    check_output_dir(out, overwrite, folder=False, inputs=[("MODEL", model), ("--data-dir", data_dir)])
    if data_dir is not None:
        eval_data.check(data_dir, task_list)
    device = _resolve_device(device)
    config = load_config(model, trust_remote_code=trust_remote_code)
    shape = Shape.from_config(config)
    if is_local(model):
        check_weights(model, shape)

    lm, tok = load_model(model, device=device, dtype=dtype, tokenizer=tokenizer, vocab=shape.vocab,
                         trust_remote_code=trust_remote_code)  # fmt: skip
    loaded = time.perf_counter()
    results, settings = evaluate_model(
        lm, tok, tasks=task_list, limit=limit, batch_size=batch_size, data_dir=data_dir,
        hellaswag_shots=hellaswag_shots, verbose=verbose,
    )
    generations = generate_samples(lm, tok, prompts)
    done = time.perf_counter()
    settings |= {"device": device, "dtype": str(lm.dtype).removeprefix("torch."), "tokenizer": tokenizer or str(model)}
    results[TOOL] = {
        "format_version": FORMAT_VERSION,
        "tool": TOOL,
        "model": {
            "path": str(Path(model).resolve()) if is_local(model) else str(model),
            "name": name or Path(str(model).rstrip("/")).name,
            "family": shape.model_type,
            "shape": shape.to_dict(),
            "params": shape.counts(),
        },
        "lineage": read_lineage(model) if is_local(model) else {},
        "settings": settings,
        "summary": summarize(results),
        "generations": {"max_new_tokens": GENERATED_TOKENS, "decoding": "greedy", "samples": generations},
        "versions": versions(),
        "timing": {
            "load_s": round(loaded - started, 3),
            "eval_s": round(done - loaded, 3),
            "total_s": round(done - started, 3),
            "requests_per_s": round(settings["requests"] / max(done - loaded, 1e-9), 3),
        },
    }
    from lm_eval.utils import handle_non_serializable  # how lm-eval's own CLI writes its results

    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    with atomic_file(out, overwrite=overwrite) as tmp:
        tmp.write_text(text + "\n", encoding="utf-8")
    return results

"""What the peer comparisons share: running minitron as a child (with its peak memory), held-out LM loss, stock
loading. The machine line, load, versions and results files are ``benchmarks/machine.py``'s, as for every
benchmark.

The scripts in this folder run as ``python benchmarks/peers/NAME.py``; importing this module puts the
repository root (for ``minitron``) and ``benchmarks/`` (for ``machine``) on ``sys.path``.
"""

from __future__ import annotations

import contextlib
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for _path in (str(ROOT), str(HERE.parent)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import machine  # noqa: E402  (benchmarks/machine.py, importable once the path above is set)

from minitron.errors import UserError

VALID = ROOT / "minitron" / "assets" / "data" / "wikitext-2" / "valid.jsonl.gz"


def need(module: str, package: str) -> None:
    """Refuse, before any work, when the peer this comparison runs is not installed."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{package} is not installed", where=module,
                        fix="install the peers extra: pip install -e '.[peers]'")  # fmt: skip


def at_least(args, **floors: int) -> None:
    """Each named whole-number flag of ``args`` is at least its floor, or one line saying which is not."""
    for name, floor in floors.items():
        value = getattr(args, name)
        if value is not None and value < floor:
            flag = "--" + name.replace("_", "-")
            raise UserError(f"must be at least {floor}, got {value}", where=flag, fix=f"pass {flag} {floor} or more")


def positive(args, **examples: float) -> None:
    """Each named flag of ``args`` is above zero, or one line saying which is not (with the example value)."""
    for name, example in examples.items():
        value = getattr(args, name)
        if not value > 0:  # also refuses nan
            flag = "--" + name.replace("_", "-")
            raise UserError(f"must be positive, got {value}", where=flag, fix=f"pass e.g. {flag} {example}")


@contextlib.contextmanager
def scratch(work: Path | None, prefix: str) -> Iterator[Path]:
    """The folder a comparison works in: ``work`` (kept, made if missing), or a temporary one removed when
    the block ends however it ends, so that a run without ``--work`` leaves nothing behind."""
    if work is not None:
        work.mkdir(parents=True, exist_ok=True)
        yield work
        return
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def child_env() -> dict[str, str]:
    """The environment of a child process that must import this checkout's ``minitron``.

    ``PEERS_THREADS`` (set by a script's ``--threads``) pins every child's intra-op threads alike: on a
    machine shared with other jobs, more threads than free cores make each tool wait on its own threads.
    """
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error", "TOKENIZERS_PARALLELISM": "false"}
    if os.environ.get("PEERS_THREADS"):
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = os.environ["PEERS_THREADS"]
    return env


def run_child(command: list[str], *, log: Path | None = None) -> dict:
    """Run ``command`` to the end; its wall time and its own peak resident set (``wait4``'s ``ru_maxrss``).

    Peak RSS of each child alone, not of the largest child so far (which ``RUSAGE_CHILDREN`` would give).
    """
    started = time.perf_counter()
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        child = subprocess.Popen(command, env=child_env(), stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except BaseException:  # interrupted: the child stops too (it unwinds on SIGTERM) before we go on
            child.terminate()
            child.wait()
            raise
    finally:
        if log:
            out.close()
    child.returncode = os.waitstatus_to_exitcode(status)
    return {
        "rc": child.returncode,
        "wall_s": time.perf_counter() - started,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # Linux reports KiB
    }


def minitron_cli(*args: str, log: Path | None = None) -> dict:
    """``minitron ARGS`` (``python -m minitron.cli``) as a child; raises with the log's tail if it fails."""
    done = run_child([sys.executable, "-m", "minitron.cli", *args], log=log)
    if done["rc"] != 0:
        tail = log.read_text()[-2000:] if log and log.is_file() else ""
        raise RuntimeError(f"minitron {' '.join(args)} failed ({done['rc']}):\n{tail}")
    return done


def heldout_blocks(tokenizer, *, samples: int, seq_len: int):
    """``samples`` blocks of WikiText-2 *valid* articles: text that no teacher, calibration or distillation
    run here reads, EOS-joined and cut as every stage cuts its data (``minitron.data.token_blocks``)."""
    from minitron.data import token_blocks

    with gzip.open(VALID, "rt", encoding="utf-8") as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    return token_blocks(tokenizer, texts, seq_len=seq_len, samples=samples, seed=0)


def block_losses(model, blocks, batch: int = 8) -> list[float]:
    """Mean next-token cross-entropy (nats per token) of ``model`` on each of ``blocks``: the samples that a
    paired comparison of two models on the same blocks draws its standard error from."""
    import torch
    import torch.nn.functional as F

    out: list[float] = []
    model.eval()
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i : i + batch]
            logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
            per_token = F.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
            out += per_token.double().mean(dim=1).tolist()
    return out


def lm_loss(model, blocks, batch: int = 8) -> float:
    """Mean next-token cross-entropy (nats per token) of ``model`` on ``blocks`` (all of one length)."""
    losses = block_losses(model, blocks, batch)
    return sum(losses) / len(losses)


def paired_difference(a: list[float], b: list[float]) -> tuple[float, float]:
    """Mean of ``a - b`` over paired samples and its standard error (0 with a single pair)."""
    import statistics

    if len(a) != len(b) or not a:
        raise ValueError(f"paired samples must match in number, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    return statistics.fmean(d), (statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0)


def plus_minus(mean: float, se: float) -> str:
    """A difference and its standard error as the results tables print them: ``+0.015 ± 0.034``."""
    return f"{mean:+.3f} ± {se:.3f}"


def load_stock(path: Path):
    """The checkpoint through stock ``AutoModelForCausalLM`` (float32, no remote code); ``(model, None)`` or
    ``(None, reason)`` when transformers refuses it or finds weights missing / unexpected."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    except Exception as e:  # noqa: BLE001 - the reason is the result
        return None, f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"
    bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    if bad:
        return None, f"loaded with {bad}"
    return model, None


def count_params(model) -> int:
    """Distinct parameters (a tied head counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def teacher_heading(teacher: dict) -> str:
    """A results section's heading: the teacher's path (repository-relative when inside it) and shape, from a
    record with ``teacher`` and ``shape`` (``Shape.to_dict()``)."""
    sh = teacher["shape"]
    return (f"## `{machine.shown(teacher['teacher'])}`: hidden {sh['hidden']}, MLP {sh['ffn']}, {sh['layers']} "
            f"layers, {sh['heads']} heads / {sh['kv_heads']} KV, vocab {sh['vocab']}, "
            f"{'tied' if sh['tied'] else 'untied'} embeddings")  # fmt: skip

"""Streamed pruning at full scale: an 8B-architecture checkpoint pruned to the Minitron-4B-Width shape.

Issue 3's goals: while ``minitron.prune.prune_checkpoint`` streams a Llama-3.1-8B-shaped checkpoint to
hidden 3072 / ffn 9216 (heads kept), its peak RSS stays ≤ 1.5× the largest teacher shard, and its wall time
≤ 1.5× a plain read + write of the same shards, measured side by side in one run.

What it does, all under one scratch folder that is deleted at the end (~16 GB teacher + one output):

1. Writes the teacher: Llama-3.1-8B's config (embedded below, so nothing outside the repository is needed)
   and random bf16 weights in meta-llama's layout: four ``model-0000X-of-00004.safetensors`` shards of at
   most 5 GB in checkpoint order, plus ``model.safetensors.index.json``. Filling 16 GB with fresh random
   numbers would take longer than the measurement, so one random block is tiled (each tensor starts at a
   different offset in it); the pruner copies bytes and never looks at the values.
2. Makes the plan with :func:`minitron.plan.make_plan` from random importance scores of the right shapes
   (the kept indices are then scattered, the worst case for slicing).
3. Runs, each in a fresh subprocess, alternately (``--rounds`` rounds, order swapped every round so that
   neither variant always goes first):
   - ``prune``: ``prune_checkpoint(teacher, plan, out)``;
   - ``copy``: the plain baseline: every tensor of every shard read with safetensors (``get_tensor``) and
     written to a new shard of the same layout (tensor by tensor, with the same safetensors writer).
   Before each run the teacher's pages are evicted from the page cache (``posix_fadvise(DONTNEED)`` on
   each shard, which needs no privileges and touches nobody else's files), so every run reads from disk.
   Each run's time includes ``fsync`` of what it wrote: both variants pay for getting their bytes onto the
   disk, not only into the page cache. Peak RSS is the process's ``VmHWM`` after resetting it to the
   current RSS (``"5"`` into ``/proc/self/clear_refs``) once Python, torch and safetensors are imported:
   memory the work itself added, file-backed (memory-mapped) pages included.
4. Checks a few pruned tensors against :func:`minitron.prune.slice_tensor` on the teacher's tensor, and
   writes ``benchmarks/results/prune_stream.{json,md}``.

Run by hand, never as a test (~10 minutes on a 2-core CPU, ~16 GB of free disk):

    python benchmarks/prune_stream.py                  # scratch folder under $TMPDIR
    python benchmarks/prune_stream.py --workdir /big/disk --rounds 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
GOAL_RSS, GOAL_TIME = 1.5, 1.5
SHARD_BYTES = 5 * 10**9  # meta-llama/Llama-3.1-8B: four shards of at most 5 GB
STUDENT = {"hidden": 3072, "ffn": 9216}  # nvidia/Llama-3.1-Minitron-4B-Width (32 heads, 8 KV heads kept)

# meta-llama/Llama-3.1-8B config.json (the fields a checkpoint needs; values as published).
LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": 128001, "hidden_act": "silu", "hidden_size": 4096,
    "initializer_range": 0.02, "intermediate_size": 14336, "max_position_embeddings": 131072,
    "mlp_bias": False, "model_type": "llama", "num_attention_heads": 32, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "pretraining_tp": 1, "rms_norm_eps": 1e-05,
    "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}  # fmt: skip


# --- /proc helpers -------------------------------------------------------------------------------------------


def proc_status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def reset_peak_rss() -> int:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0) and return that RSS."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return proc_status("VmRSS")


def evict(paths) -> None:
    """Drop these files' pages from the page cache (after flushing them), so the next read hits the disk."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def fsync_tree(folder: Path) -> None:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def shard_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


# --- the teacher -----------------------------------------------------------------------------------------------


def write_teacher(folder: Path, config: dict, block_mib: int) -> dict:
    """The 8B-shaped checkpoint of random bf16 weights in meta-llama's shard layout; returns its shard sizes."""
    import torch

    from minitron.families import Shape
    from minitron.plan import make_plan
    from minitron.prune import student_items
    from minitron.shards import shard_groups, write_safetensors
    from minitron.report_console import progress

    teacher = Shape.from_config(config)
    # The identity plan's items are the checkpoint's tensors in save_pretrained's order.
    items = student_items(make_plan(teacher, teacher))
    entries = [(item.name, "BF16", teacher.tensor_shape(item.spec)) for item in items]
    sizes = [math.prod(shape) * 2 for _, _, shape in entries]
    shards = shard_groups(sizes, SHARD_BYTES)
    names = [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    block = torch.randn(block_mib * 2**20 // 2, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)

    def tiled(i: int, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        out = torch.empty(n, dtype=torch.bfloat16)
        start = (i * 7919) % len(block)  # a different phase per tensor, so no two tensors are equal
        done = 0
        while done < n:
            take = min(n - done, len(block) - start)
            out[done : done + take] = block[start : start + take]
            done, start = done + take, 0
        return out.view(shape)

    folder.mkdir(parents=True)
    with progress() as bar:
        task = bar.add_task("writing the 8B teacher", total=sum(sizes))

        def tensors(members):
            for i in members:
                yield tiled(i, entries[i][2])
                bar.advance(task, sizes[i])

        for name, members in zip(names, shards):
            write_safetensors(folder / name, [entries[i] for i in members], tensors(members))
    weight_map = {entries[i][0]: name for name, members in zip(names, shards) for i in members}
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    fsync_tree(folder)
    return {name: (folder / name).stat().st_size for name in names}


def make_student_plan(config: dict, seed: int):
    """The 4B-Width plan from random scores of every contract key the plan reads."""
    import torch

    from minitron.families import Shape
    from minitron.importance import Scores
    from minitron.plan import make_plan, student_shape

    teacher = Shape.from_config(config)
    g = torch.Generator().manual_seed(seed)
    tensors = {"hidden": torch.rand(teacher.hidden, generator=g), "blocks": torch.rand(teacher.layers, generator=g)}
    for i in range(teacher.layers):
        tensors[f"heads.{i}"] = torch.rand(teacher.heads, generator=g)
        tensors[f"kv_groups.{i}"] = torch.rand(teacher.kv_heads, generator=g)
        tensors[f"neurons.{i}"] = torch.rand(teacher.ffn, generator=g)
    student = student_shape(teacher, **STUDENT)
    return make_plan(teacher, student, Scores(tensors, {"shape": teacher.to_dict()}))


# --- the measured variants (each in a fresh process) ------------------------------------------------------------


def child(variant: str, teacher: Path, out: Path, plan_file: Path) -> dict:
    import torch  # noqa: F401  (imported before the peak is reset: the import is not the work)
    from safetensors import safe_open

    from minitron.plan import Plan
    from minitron.prune import prune_checkpoint
    from minitron.shards import write_safetensors

    plan = Plan.load(plan_file)
    rss_before = reset_peak_rss()
    start = time.perf_counter()
    if variant == "prune":
        prune_checkpoint(teacher, plan, out, show_progress=False)
    else:
        out.mkdir()
        for shard in shard_files(teacher):
            with safe_open(shard, "pt") as f:
                keys = list(f.keys())
                entries = [(k, f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in keys]
                write_safetensors(out / shard.name, entries, (f.get_tensor(k) for k in keys))
        shutil.copy2(teacher / "model.safetensors.index.json", out)
        shutil.copy2(teacher / "config.json", out)
    work = time.perf_counter() - start
    fsync_tree(out)
    total = time.perf_counter() - start
    return {
        "variant": variant,
        "wall_s": total,
        "wall_before_fsync_s": work,
        "peak_rss_bytes": proc_status("VmHWM"),
        "rss_before_bytes": rss_before,
        "peak_minus_before_bytes": proc_status("VmHWM") - rss_before,
        "written_bytes": sum(p.stat().st_size for p in out.rglob("*") if p.is_file()),
        "cpu_s": time.process_time(),
    }


def run_child(variant: str, teacher: Path, out: Path, plan_file: Path) -> dict:
    evict(shard_files(teacher))
    cmd = [sys.executable, __file__, "--child", variant, "--teacher", str(teacher), "--child-out", str(out),
           "--plan", str(plan_file)]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def check_pruned(teacher: Path, student: Path, plan) -> list[str]:
    """Compare a few pruned tensors with ``slice_tensor`` applied to the teacher's tensor in memory."""
    import torch
    from safetensors import safe_open

    from minitron.inputs import weights_index
    from minitron.prune import student_items, slice_tensor

    stored = weights_index(teacher)
    items = {item.name: item for item in student_items(plan, present=set(stored))}
    index_file = student / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())["weight_map"] if index_file.exists() else {}
    last = plan.student.layers - 1
    checked = []
    for name in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 f"model.layers.{last}.mlp.down_proj.weight", f"model.layers.{last}.self_attn.o_proj.weight"):  # fmt: skip
        item = items[name]
        with safe_open(stored[item.source].file, "pt") as f:
            expected = slice_tensor(item.spec, f.get_tensor(item.source).__getitem__, plan, item.layer)
        with safe_open(student / index.get(name, "model.safetensors"), "pt") as f:
            got = f.get_tensor(name)
        if not torch.equal(got, expected):
            raise SystemExit(f"pruned {name} differs from slice_tensor on the teacher's tensor")
        checked.append(name)
    return checked


# --- the driver ----------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default: a new one in $TMPDIR)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of prune + copy, order swapped each round")
    parser.add_argument("--block-mib", type=int, default=64, help="size of the random block tiled into the weights")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=32, help="fewer layers: a quick check of this script only")
    parser.add_argument("--out", type=Path, default=RESULTS / "prune_stream", help="results path without suffix")
    parser.add_argument("--note", default="", help="what else the machine was doing (goes into the results)")
    parser.add_argument("--keep", action="store_true", help="keep the scratch folder (to --reuse its teacher)")
    parser.add_argument("--reuse", type=Path, default=None, help="a scratch folder kept by --keep: skip writing")
    parser.add_argument("--child", choices=["prune", "copy"], help=argparse.SUPPRESS)
    parser.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--plan", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.teacher, args.child_out, args.plan)))
        return

    work = Path(tempfile.mkdtemp(prefix="prune_stream-", dir=args.workdir)) if args.reuse is None else args.reuse
    try:
        record = measure(args, work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def measure(args, work: Path) -> dict:
    import safetensors
    import torch

    from minitron.report_console import progress

    config = {**LLAMA_31_8B, "num_hidden_layers": args.layers}
    teacher = work / "llama-3.1-8b-random"
    load_before = os.getloadavg()
    start = time.perf_counter()
    if args.reuse is None:
        shard_sizes = write_teacher(teacher, config, args.block_mib)
    else:  # a teacher kept by an earlier run (development only: the results say so)
        shard_sizes = {p.name: p.stat().st_size for p in shard_files(teacher)}
    write_s = time.perf_counter() - start
    plan = make_student_plan(config, args.seed)
    plan_file = work / "plan.json"
    plan.save(plan_file)

    runs, checked = [], []
    order = ["prune", "copy"]
    with progress() as bar:
        task = bar.add_task("prune vs plain copy", total=2 * args.rounds)
        for r in range(args.rounds):
            for variant in order if r % 2 == 0 else order[::-1]:
                bar.update(task, description=f"round {r + 1}: {variant}")
                out = work / f"out-{variant}"
                result = run_child(variant, teacher, out, plan_file)
                result["round"] = r + 1
                runs.append(result)
                if variant == "prune" and not checked:
                    checked = check_pruned(teacher, out, plan)
                shutil.rmtree(out)
                bar.advance(task)

    largest = max(shard_sizes.values())
    med = {v: statistics.median(r["wall_s"] for r in runs if r["variant"] == v) for v in order}
    peak = {v: max(r["peak_rss_bytes"] for r in runs if r["variant"] == v) for v in order}
    peak_work = {v: max(r["peak_minus_before_bytes"] for r in runs if r["variant"] == v) for v in order}
    return {
        "machine": machine.describe("cpu"),
        "note": args.note,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "torch": torch.__version__,
        "safetensors": safetensors.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python", "benchmarks/prune_stream.py", *sys.argv[1:]]),
        "teacher": {
            "shape": f"Llama-3.1-8B (hidden 4096, ffn 14336, {args.layers} layers, 32 heads / 8 KV, vocab 128256), bf16",
            "params": plan.teacher.counts()["total"],
            "shards": shard_sizes,
            "bytes": sum(shard_sizes.values()),
            "write_s": write_s,
            "reused": args.reuse is not None,
        },
        "student": {
            "shape": f"hidden 3072, ffn 9216, {args.layers} layers, 32 heads / 8 KV, head_dim 128 (Minitron-4B-Width)",
            "params": plan.student.counts()["total"],
        },
        "cache": "teacher shards evicted from the page cache (fsync + posix_fadvise DONTNEED) before every run",
        "checked_tensors": checked,
        "runs": runs,
        "goals": {"peak_rss_over_largest_shard_max": GOAL_RSS, "time_over_copy_max": GOAL_TIME},
        "largest_shard_bytes": largest,
        "prune_peak_rss_over_largest_shard": peak["prune"] / largest,
        "prune_work_rss_over_largest_shard": peak_work["prune"] / largest,
        "copy_peak_rss_over_largest_shard": peak["copy"] / largest,
        "median_wall_s": med,
        "prune_time_over_copy": med["prune"] / med["copy"],
    }


def markdown(r: dict) -> str:
    gb = 1e9
    t, s = r["teacher"], r["student"]
    ok = lambda good: "met" if good else "**not met**"  # noqa: E731
    rss, speed = r["prune_peak_rss_over_largest_shard"], r["prune_time_over_copy"]
    lines = [
        "# Streamed pruning of an 8B-architecture checkpoint to the 4B-Width shape",
        "",
        f"Machine: {r['machine']}" + (f"; {r['note']}" if r["note"] else "") + f". Load average "
        f"{r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after. torch {r['torch']}, "
        f"safetensors {r['safetensors']}. Command: `{r['command']}`.",
        "",
        f"Teacher: {t['shape']}, {t['params']:,} parameters, random weights written by the benchmark in "
        f"{len(t['shards'])} shards of " + ", ".join(f"{b / gb:.2f}" for b in t["shards"].values())
        + f" GB ({t['bytes'] / gb:.2f} GB, written in {t['write_s']:.0f} s). "
        f"Student: {s['shape']}, {s['params']:,} parameters. {r['cache'].capitalize()}; times include fsync of "
        "the output. Peak RSS = VmHWM of the run's own process after a reset once imports are done "
        "(memory-mapped file pages included).",
        "",
        "| round | variant | wall s | of which fsync s | CPU s | written GB | peak RSS GB | RSS at reset GB |",
        "|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in r["runs"]:
        lines.append(
            f"| {run['round']} | {run['variant']} | {run['wall_s']:.1f} | {run['wall_s'] - run['wall_before_fsync_s']:.1f} "
            f"| {run['cpu_s']:.1f} | {run['written_bytes'] / gb:.2f} | {run['peak_rss_bytes'] / gb:.2f} "
            f"| {run['rss_before_bytes'] / gb:.2f} |"
        )
    lines += [
        "",
        f"- Peak RSS of the streamed prune: **{rss:.2f}× the largest shard** ({r['largest_shard_bytes'] / gb:.2f} GB); "
        f"goal ≤ {r['goals']['peak_rss_over_largest_shard_max']}×: {ok(rss <= GOAL_RSS)}. Above the RSS at the "
        f"reset (Python + torch): {r['prune_work_rss_over_largest_shard']:.2f}×. The plain copy peaks at "
        f"{r['copy_peak_rss_over_largest_shard']:.2f}× (its memory-mapped shard stays resident while open).",
        f"- Wall time, median over rounds: prune {r['median_wall_s']['prune']:.1f} s, plain read + write "
        f"{r['median_wall_s']['copy']:.1f} s: **{speed:.2f}×**; goal ≤ {r['goals']['time_over_copy_max']}×: "
        f"{ok(speed <= GOAL_TIME)}.",
        f"- Checked equal to `slice_tensor` on the teacher's tensors: {', '.join(r['checked_tensors'])}.",
        "",
        "Raw numbers: `prune_stream.json` beside this file.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

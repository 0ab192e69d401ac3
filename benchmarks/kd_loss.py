"""KD loss benchmark: chunked fused-head forward KL (minitron.losses.forward_kl) vs the naive loss and
the libraries' losses.

Implementations, all computing τ² · mean over tokens of KL(teacher ‖ student) on ``hidden @ head.T``
logits, forward + backward to the student's hidden states and head weight:

* ``naive``: what one writes with full logits: ``hs @ Ws.T`` and ``ht @ Wt.T`` materialised for all
  tokens, ``minitron.losses.naive_forward_kl`` on them, ``backward()``.
* ``chunked``: ``minitron.losses.forward_kl`` (one run per ``--chunk-size``).
* ``modelopt``: nvidia-modelopt's ``LogitsDistillationLoss(reduction="none")`` on the same full logits,
  averaged over tokens (its ``"mean"`` would average over tokens × vocabulary entries).
* ``liger``: Liger-Kernel's ``LigerFusedLinearJSD`` with ``jsd_beta=0`` (forward KL), which fuses the head
  like ``chunked``. It needs Triton and a CUDA GPU: on a CPU it is listed as not run, with the reason.

Each run records its loss value, so the table shows the implementations agree.

Each measurement runs in its own Python process, so peak memory is that of one implementation alone:

* CPU: the resident-set high-water mark (``VmHWM``), reset through ``/proc/self/clear_refs`` after the
  inputs are built, minus the resident set at that moment (``VmRSS``) = memory the loss added on top of
  its inputs (logits, softmax blocks, gradients). glibc's mmap threshold is fixed at 1 MiB so that freed
  blocks leave the resident set. tracemalloc does not see torch's allocations.
* CUDA: ``torch.cuda.max_memory_allocated()`` after a reset, minus what was allocated before.

Time is one forward + backward at ``--time-tokens``, measured in one process that runs the
implementations in turn, round after round (one warm-up step each, then ``--repeats`` rounds; medians), so
that a burst of load on a shared machine hits all of them alike. On CPU both wall time and process CPU
time (all threads) are recorded: on a shared machine wall time is inflated by other people's jobs, CPU
time much less so.

Run by hand, never as a test (a few minutes):

    python benchmarks/kd_loss.py --note "shared with ..."   # CPU defaults: 2 threads, small hidden sizes
    python benchmarks/kd_loss.py --device cuda --student-hidden 3072 --teacher-hidden 4096 \\
        --dtype bfloat16 --naive-tokens 2048 4096 8192 --time-tokens 8192

Results go to ``benchmarks/results/kd_loss.{json,md}`` (``kd_loss_cuda.*`` for ``--device cuda``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
GOAL_MEMORY, GOAL_SPEED = 0.15, 0.9


# ---------------------------------------------------------------------------------------------------
# worker: one implementation, one token count, in a fresh process
# ---------------------------------------------------------------------------------------------------


IMPLS = ("naive", "chunked", "modelopt", "liger")


def unavailable(impl: str, device: str) -> str | None:
    """Why ``impl`` cannot run here, or ``None`` if it can."""
    import importlib.util

    if impl == "modelopt":
        if importlib.util.find_spec("modelopt") is None:
            return "nvidia-modelopt is not installed"
        try:
            modelopt_loss()
        except Exception as error:  # noqa: BLE001 - any failure to import is a reason not to run it
            return f"nvidia-modelopt's LogitsDistillationLoss does not import: {type(error).__name__}: {error}"
    if impl == "liger":
        if device != "cuda":
            return "Liger-Kernel's fused linear JSD is a Triton kernel: it needs a CUDA GPU"
        if importlib.util.find_spec("liger_kernel") is None:
            return "liger-kernel is not installed (pip install liger-kernel)"
    return None


def modelopt_loss():
    """nvidia-modelopt's ``LogitsDistillationLoss`` class, and how it was imported.

    The package import (``modelopt.torch``) pulls in its whole optimisation stack (omegaconf, pulp's 16 MB
    solver, ...); ``distill/losses.py`` itself needs only torch. Where the package import fails, that one
    file of the installed package is loaded on its own: the same class, unchanged.
    """
    try:
        from modelopt.torch.distill.losses import LogitsDistillationLoss

        return LogitsDistillationLoss, "modelopt.torch.distill.losses"
    except ImportError as error:
        import importlib.util

        root = importlib.util.find_spec("modelopt").submodule_search_locations[0]
        path = Path(root) / "torch" / "distill" / "losses.py"
        spec = importlib.util.spec_from_file_location("modelopt_distill_losses", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module.LogitsDistillationLoss, f"{path} alone (the package import failed: {error})"


def make_inputs(args):
    import torch

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    n, v, d, dt = args.tokens, args.vocab, args.student_hidden, args.teacher_hidden
    # Logits of std ~3, like a trained LM's: softmax neither uniform nor one-hot.
    hs = randn(n, d).requires_grad_()
    ws = randn(v, d, scale=3 / d**0.5).requires_grad_()
    ht, wt = randn(n, dt), randn(v, dt, scale=3 / dt**0.5)
    return hs, ws, ht, wt


def make_step(impl: str, chunk: int, inputs, temperature: float):
    """One forward + backward of ``impl``; returns the loss value."""
    import torch

    from minitron.losses import forward_kl, naive_forward_kl

    hs, ws, ht, wt = inputs

    def full_logits():
        with torch.no_grad():
            teacher_logits = ht @ wt.T
        return hs @ ws.T, teacher_logits

    if impl == "naive":

        def loss():
            return naive_forward_kl(*full_logits(), temperature=temperature)

    elif impl == "chunked":

        def loss():
            return forward_kl(hs, ws, ht, wt, temperature=temperature, chunk_size=chunk)

    elif impl == "modelopt":
        kd = modelopt_loss()[0](temperature=temperature, reduction="none")  # per token, T² included

        def loss():
            student_logits, teacher_logits = full_logits()
            return kd(student_logits.float(), teacher_logits.float()).mean()

    else:
        from liger_kernel.transformers import LigerFusedLinearJSD

        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)  # beta 0: forward KL

        def loss():
            return jsd(hs, ws, ht, wt)

    def step() -> float:
        hs.grad = ws.grad = None
        value = loss()
        value.backward()
        return float(value.detach())

    return step


def worker(args) -> dict:
    """Peak memory of one implementation at one token count (a fresh process, one step)."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = make_inputs(args)
    chunk = args.chunk_size[0]
    step = make_step(args.impl, chunk, inputs, args.temperature)
    return measure(torch, device, step, args.impl, args.tokens, chunk)


def measure(torch, device, step, impl: str, tokens: int, chunk: int | None) -> dict:
    """Peak memory and loss value of one step; running out of GPU memory is a result (what fusing avoids)."""
    meter = _CudaMemory() if device.type == "cuda" else _RssMemory()
    meter.start()
    row = {"impl": impl, "tokens": tokens, "chunk_size": chunk if impl == "chunked" else None}
    try:
        loss = step()
        _sync(torch, device)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    return {**row, "peak_bytes": meter.peak(), "loss": loss}


def memory_worker(args, jobs: list) -> None:
    """On a GPU, every memory measurement in this one process: the allocator's peak is reset before each
    (``max_memory_allocated`` counts live tensors only, so what one step left cached does not count)."""
    import torch

    device = torch.device(args.device)
    for n in sorted({n for _, n, _ in jobs}):
        args.tokens = n
        inputs = make_inputs(args)
        for impl, _, chunk in (job for job in jobs if job[1] == n):
            step = make_step(impl, chunk, inputs, args.temperature)
            print("RESULT " + json.dumps(measure(torch, device, step, impl, n, chunk)), flush=True)
            del step
            inputs[0].grad = inputs[1].grad = None
            torch.cuda.empty_cache()
        del inputs


def timing_worker(args) -> dict:
    """Wall and CPU time of every implementation at one token count, interleaved in one process."""
    import torch

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    inputs = make_inputs(args)
    steps = {}
    for impl in args.impls:
        for chunk in args.chunk_size if impl == "chunked" else [None]:
            steps[impl if chunk is None else f"chunked/{chunk}"] = make_step(impl, chunk, inputs, args.temperature)
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    failed = {}
    for i in range(args.warmup + args.repeats):
        for name, step in steps.items():
            if name in failed:
                continue
            _sync(torch, device)
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                step()
            except torch.OutOfMemoryError:
                failed[name] = "out of memory"
                inputs[0].grad = inputs[1].grad = None
                torch.cuda.empty_cache()
                continue
            _sync(torch, device)
            if i >= args.warmup:
                wall[name].append(time.perf_counter() - t0)
                cpu[name].append(time.process_time() - c0)
    wall = {name: times for name, times in wall.items() if name not in failed}
    cpu = {name: times for name, times in cpu.items() if name not in failed}
    return {"tokens": args.tokens, "wall_s": wall, "cpu_s": cpu if device.type == "cpu" else None, "failed": failed}


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


class _RssMemory:
    """Resident-set high-water mark above the RSS at ``start()`` (Linux /proc)."""

    def start(self):
        import gc

        gc.collect()
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # "5" resets VmHWM to the current RSS (Linux ≥ 4.0)
        self.base = _proc_status("VmRSS")

    def peak(self):
        return _proc_status("VmHWM") - self.base


class _CudaMemory:
    def start(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.base = torch.cuda.memory_allocated()

    def peak(self):
        import torch

        return torch.cuda.max_memory_allocated() - self.base


def _proc_status(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{key} not in /proc/self/status")


# ---------------------------------------------------------------------------------------------------
# driver: schedule the workers, summarise, write JSON + Markdown
# ---------------------------------------------------------------------------------------------------


def main(argv=None) -> None:
    args = parse(argv)
    if args.impl == "timing":  # we are the timing worker
        print("RESULT " + json.dumps(timing_worker(args)))
        return
    if args.impl == "memory":  # we are the GPU's memory worker, all jobs
        memory_worker(args, json.loads(args.jobs))
        return
    if args.impl:  # we are a memory worker
        print("RESULT " + json.dumps(worker(args)))
        return

    from rich.console import Console

    from minitron.report_console import progress

    skipped = {impl: why for impl in IMPLS if (why := unavailable(impl, args.device))}
    impls = [impl for impl in IMPLS if impl not in skipped]
    full_logits = [impl for impl in impls if impl in ("naive", "modelopt")]  # N × V tensors: RAM-bound
    naive_tokens = sorted(set(args.naive_tokens))
    fused_tokens = sorted(set(naive_tokens + [args.tokens, *args.time_tokens]))
    jobs = []  # (impl, tokens, chunk): each implementation beside the others at every token count
    for n in fused_tokens:
        jobs += [(impl, n, None) for impl in full_logits if n in naive_tokens]
        jobs += [("chunked", n, chunk) for chunk in args.chunk_size]
        if "liger" in impls:
            jobs.append(("liger", n, None))
    load_before = os.getloadavg()
    runs, timings = [], []
    with progress() as bar:
        task = bar.add_task("KD loss benchmark", total=len(jobs) + len(args.time_tokens))
        if args.device == "cuda":  # exact per-measurement peaks in one process: no process start per job
            bar.update(task, description=f"memory: {len(jobs)} measurements")
            runs = run_worker(args, "memory", 0, None, jobs=jobs)
            bar.advance(task, len(jobs))
        for impl, n, chunk in jobs if args.device != "cuda" else []:
            bar.update(task, description=f"memory: {impl} @ {n} tokens" + (f", chunk {chunk}" if chunk else ""))
            runs.append(run_worker(args, impl, n, chunk))
            bar.advance(task)
        for n in args.time_tokens:
            bar.update(task, description=f"time: all @ {n} tokens, interleaved")
            timings.append(run_worker(args, "timing", n, None, impls=impls))
            bar.advance(task)
    results = summarise(args, runs, timings, skipped, load_before)
    if "modelopt" in impls:
        results["modelopt_import"] = modelopt_loss()[1]
    out = Path(args.out or ROOT / "benchmarks" / "results" / ("kd_loss" if args.device == "cpu" else "kd_loss_cuda"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    out.with_suffix(".md").write_text(markdown(results))
    Console().print(markdown(results))


def run_worker(args, impl: str, tokens: int, chunk: int | None, impls: list[str] | None = None, jobs=None):
    cmd = [sys.executable, __file__, "--impl", impl, "--tokens", str(tokens)]
    cmd += ["--chunk-size", *map(str, [chunk] if chunk else args.chunk_size)]
    cmd += ["--warmup", str(args.warmup), "--repeats", str(args.repeats), "--impls", *(impls or [impl])]
    for key in ("device", "dtype", "vocab", "student_hidden", "teacher_hidden", "threads"):
        cmd += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    cmd += ["--temperature", str(args.temperature)]
    if jobs is not None:
        cmd += ["--jobs", json.dumps(jobs)]
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep carried packages
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": path}
    # A fixed glibc mmap threshold: every block over 1 MiB is mapped on allocation and unmapped on free,
    # so RSS follows the live tensors instead of freed-but-kept heap (same setting for every loss).
    env["MALLOC_MMAP_THRESHOLD_"] = str(1 << 20)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"worker {impl}@{tokens} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    if impl == "memory":
        return [json.loads(line[len("RESULT ") :]) for line in lines]
    return json.loads(lines[-1][len("RESULT ") :])


def _extrapolate(measured: dict[int, int], tokens: int) -> float:
    """Full-logit peaks grow linearly with tokens × vocab: the line through the two largest measured points."""
    (n0, b0), (n1, b1) = sorted(measured.items())[-2:]
    return b1 + (b1 - b0) / (n1 - n0) * (tokens - n1)


def summarise(args, runs: list[dict], timings: list[dict], skipped: dict[str, str], load_before) -> dict:
    import torch

    failed = [r for r in runs if "error" in r]
    runs = [r for r in runs if "error" not in r]
    # Full-logit losses where they could not be run (RAM) are extrapolated, and marked so.
    full = {}
    for impl in ("naive", "modelopt"):
        measured = {r["tokens"]: r["peak_bytes"] for r in runs if r["impl"] == impl}
        if measured:
            full[impl] = {n: (b, True) for n, b in measured.items()}
            if len(measured) >= 2:
                for r in runs:
                    full[impl].setdefault(r["tokens"], (_extrapolate(measured, r["tokens"]), False))

    memory = []
    for r in sorted((r for r in runs if r["impl"] in ("chunked", "liger")), key=lambda r: (r["impl"], r["chunk_size"] or 0, r["tokens"])):
        row = {"impl": r["impl"], "tokens": r["tokens"], "chunk_size": r["chunk_size"], "fused_bytes": r["peak_bytes"]}
        for impl, peaks in full.items():
            if r["tokens"] in peaks:
                row[f"{impl}_bytes"], row[f"{impl}_measured"] = peaks[r["tokens"]]
        if "naive_bytes" in row:
            row["ratio"] = row["fused_bytes"] / row["naive_bytes"]
        memory.append(row)

    losses = {}
    for r in runs:
        name = r["impl"] if r["impl"] != "chunked" else f"chunked/{r['chunk_size']}"
        losses.setdefault(str(r["tokens"]), {})[name] = r["loss"]

    timing = []
    for block in timings:
        speed = {}
        for name, wall in block["wall_s"].items():
            row = {"wall_s": statistics.median(wall)}
            if block["cpu_s"]:
                row["cpu_s"] = statistics.median(block["cpu_s"][name])
            speed[name] = row
        for name, row in speed.items():  # speed relative to naive: > 1 is faster
            for kind in ("wall", "cpu"):
                if f"{kind}_s" in row and "naive" in speed:
                    row[f"speed_vs_naive_{kind}"] = speed["naive"][f"{kind}_s"] / row[f"{kind}_s"]
        timing.append({"tokens": block["tokens"], "per_impl": speed, "failed": block.get("failed", {}), "raw": block})

    return {
        "machine": machine.describe(args.device),
        "note": args.note,
        "logical_cpus": os.cpu_count(),
        "threads": args.threads,
        "load_average_before": load_before,
        "load_average_after": os.getloadavg(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "command": " ".join(["python", "benchmarks/kd_loss.py", *sys.argv[1:]]),
        "settings": {
            "device": args.device,
            "dtype": args.dtype,
            "vocab": args.vocab,
            "tokens": args.tokens,
            "time_tokens": args.time_tokens,
            "student_hidden": args.student_hidden,
            "teacher_hidden": args.teacher_hidden,
            "chunk_size": args.chunk_size,
            "temperature": args.temperature,
            "warmup": args.warmup,
            "repeats": args.repeats,
        },
        "memory_method": (
            "RSS high-water (VmHWM, reset via /proc/self/clear_refs) minus RSS after building the inputs, "
            "one process per measurement, MALLOC_MMAP_THRESHOLD_=1MiB"
            if args.device == "cpu"
            else "torch.cuda.max_memory_allocated minus allocated before (peak reset before each), one process for all"
        ),
        "goals": {"memory_ratio_max": GOAL_MEMORY, "speed_ratio_min": GOAL_SPEED},
        "not_run": skipped,
        "memory": memory,
        "losses": losses,
        "timing": timing,
        "failed": failed,
        "runs": runs,
    }


def markdown(r: dict) -> str:
    s = r["settings"]
    gib = 1024**3
    mark = lambda good: "✅" if good else "❌"  # noqa: E731

    def peak(row, impl):
        if f"{impl}_bytes" not in row:
            return "—"
        return f"{row[f'{impl}_bytes'] / gib:.2f}" + ("" if row[f"{impl}_measured"] else " (extrapolated)")

    lines = [
        "# KD loss: chunked fused-head forward KL vs naive and the libraries",
        "",
        f"Machine: **{r['machine']}** ({r['threads']} threads, torch {r['torch']})"
        + (f"; {r['note']}" if r["note"] else "")
        + f". Load average {r['load_average_before'][0]:.1f} before, {r['load_average_after'][0]:.1f} after.",
        "",
        f"Vocab {s['vocab']:,}, student hidden {s['student_hidden']}, teacher hidden {s['teacher_hidden']}, "
        f"{s['dtype']}, τ = {s['temperature']}. "
        "One forward + backward of the loss w.r.t. the student's hidden states and head weight. "
        f"Command: `{r['command']}`.",
        "",
        f"Peak memory: {r['memory_method']}. Full-logit losses (naive, modelopt) hold several tokens × vocab "
        "float32 tensors; where they do not fit in this machine's RAM, their peak is extrapolated from the two "
        "largest measured token counts (it is linear in tokens), and marked so.",
        "",
        f"| tokens | fused loss | naive peak (GiB) | modelopt peak (GiB) | fused peak (GiB) | fused / naive | "
        f"goal ≤ {r['goals']['memory_ratio_max']} at {s['tokens']:,} tokens |",
        "|---:|---|---:|---:|---:|---:|---|",
    ]
    for m in r["memory"]:
        name = "minitron chunk " + str(m["chunk_size"]) if m["impl"] == "chunked" else m["impl"]
        ratio = f"{m['ratio']:.3f}" if "ratio" in m else "—"
        at_goal = "ratio" in m and m["tokens"] == s["tokens"]  # the goal is stated at this token count
        ok = mark(m["ratio"] <= r["goals"]["memory_ratio_max"]) if at_goal else ""
        lines.append(f"| {m['tokens']:,} | {name} | {peak(m, 'naive')} | {peak(m, 'modelopt')} | "
                     f"{m['fused_bytes'] / gib:.2f} | {ratio} | {ok} |")  # fmt: skip
    for t in r["timing"]:
        lines += [
            "",
            f"Time of one forward + backward at {t['tokens']:,} tokens: one process, implementations in turn, "
            f"{s['warmup']} warm-up + {s['repeats']} rounds, medians. Speed = naive time / this time "
            f"(goal for minitron's chunked loss ≥ {r['goals']['speed_ratio_min']}×).",
            "",
            "| implementation | wall s | speed (wall) | CPU s | speed (CPU) |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, row in t["per_impl"].items():
            goal = name.startswith("chunked/")  # the goal is about minitron's loss
            label = f"minitron chunked, chunk {name.split('/')[1]}" if goal else name

            def speed(kind, row=row, goal=goal):
                if f"speed_vs_naive_{kind}" not in row:
                    return "—"
                value = row[f"speed_vs_naive_{kind}"]
                return f"{value:.2f}×" + (f" {mark(value >= r['goals']['speed_ratio_min'])}" if goal else "")

            cpu_s = f"{row['cpu_s']:.2f}" if "cpu_s" in row else "—"
            lines.append(f"| {label} | {row['wall_s']:.4f} | {speed('wall')} | {cpu_s} | {speed('cpu')} |")
        lines += [f"| {name} | failed: {why} | | | |" for name, why in t["failed"].items()]
    names = sorted({name for values in r["losses"].values() for name in values})
    lines += ["", "Loss values of the memory runs (the implementations agree):", "",
              "| tokens | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]  # fmt: skip
    for n, values in sorted(r["losses"].items(), key=lambda kv: int(kv[0])):
        lines.append(f"| {int(n):,} | " + " | ".join(f"{values[k]:.6f}" if k in values else "—" for k in names) + " |")
    if r.get("modelopt_import"):
        lines += ["", f"nvidia-modelopt's loss imported from {r['modelopt_import']}."]
    if r.get("failed"):
        lines += ["", "Failed memory runs:"] + [
            f"- {f['impl']}{' chunk ' + str(f['chunk_size']) if f['chunk_size'] else ''} @ {f['tokens']:,} tokens: "
            f"{f['error']}." for f in r["failed"]
        ]  # fmt: skip
    if r["not_run"]:
        lines += ["", "Not run here:"] + [f"- {impl}: {why}." for impl, why in r["not_run"].items()]
    lines += ["", "Raw runs: `kd_loss.json` beside this file.", ""]
    return "\n".join(lines)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--tokens", type=int, default=8192, help="the token count the memory goal is about")
    p.add_argument("--naive-tokens", type=int, nargs="+", default=[1024, 2048],
                   help="token counts at which the full-logit losses run (~3.5 GiB per 1k tokens at 128k vocab)")  # fmt: skip
    p.add_argument("--time-tokens", type=int, nargs="+", default=[2048], help="token counts of the timed comparison")
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=384)
    p.add_argument("--chunk-size", type=int, nargs="+", default=[256, 1024], help="one or more chunk sizes")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--note", default="", help="what else the machine was doing (goes into the results)")
    p.add_argument("--out", type=Path, default=None, help="output path without suffix")
    p.add_argument("--impl", choices=[*IMPLS, "timing", "memory"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--jobs", default=None, help=argparse.SUPPRESS)
    p.add_argument("--impls", nargs="+", default=list(IMPLS), help=argparse.SUPPRESS)
    return p.parse_args(argv)


if __name__ == "__main__":
    main()

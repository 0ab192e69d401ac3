"""Importance pass vs a plain forward, and layer-by-layer vs whole-model, on a ~100M-parameter random Llama.

Run by hand (a few minutes on 2 CPU threads); writes benchmarks/results/importance_speed.{json,md}:

    python benchmarks/importance_speed.py            # 1 thread: on a shared 2-core machine, 2 oversubscribe

1. Speed: over the same calibration tokens, side by side and interleaved (so a shared machine's load hits
   all variants alike), the median time of
   - ``forward``: a plain ``torch.no_grad()`` forward of the causal LM (logits included);
   - ``decoder``: the same without the output head (what the importance pass runs);
   - ``importance``: ``compute_scores`` (hooks, streaming aggregation, finalisation).
   Goal (issue 2): importance ≤ 1.10 × forward.
2. Memory: each mode in a fresh subprocess (peak RSS only grows within a process): whole-model
   (``from_pretrained`` + ``compute_scores``), layer by layer (``offload=True``; on a CPU-only machine the
   model stays in the same RAM, so this measures the pass, not a saving), and streamed from the
   checkpoint's safetensors (``score_checkpoint``: only one layer's weights in memory). Also the largest
   difference between their scores, which must be float noise. On a GPU, peak device memory too.

The GPU suite (``benchmarks/gpu/run.sh``) runs the speed part alone on the real Llama-3.1-8B shape, random
bf16 weights built on the GPU from ``--config benchmarks/gpu/models/llama-3.1-8b``:

    python benchmarks/importance_speed.py --device cuda --config benchmarks/gpu/models/llama-3.1-8b \\
        --dtype bfloat16 --samples 8 --seq-len 4096 --batch-size 2 --parts speed --out /tmp/importance_cuda
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

RESULTS = Path(__file__).parent / "results"


def llama_100m():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
        num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def configured_model(args):
    """Random weights of ``--config``'s shape (with ``--override key=value,...``), built on the device in ``--dtype``."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(args.config)
    for item in filter(None, args.override.split(",")):
        key, value = item.split("=", 1)
        setattr(config, key, json.loads(value))
    torch.manual_seed(0)
    with torch.device(args.device):
        return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype)).eval()


def calibration(samples: int, seq_len: int, vocab: int = 32000) -> torch.Tensor:
    return torch.randint(0, vocab, (samples, seq_len), generator=torch.Generator().manual_seed(0))


def timed(fn) -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def speed(args) -> dict:
    from minitron.importance import compute_scores

    device = torch.device(args.device)
    model = configured_model(args) if args.config else llama_100m().to(device)
    blocks = calibration(args.samples, args.seq_len, model.config.vocab_size)
    batches = [blocks[i : i + args.batch_size].to(device) for i in range(0, len(blocks), args.batch_size)]

    def forward():
        with torch.no_grad():
            for ids in batches:
                model(ids)

    def decoder():
        with torch.no_grad():
            for ids in batches:
                model.model(input_ids=ids, use_cache=False)

    def importance():
        compute_scores(model, blocks, batch_size=args.batch_size, show_progress=False)

    variants = {"forward": forward, "decoder": decoder, "importance": importance}
    with torch.no_grad():
        model(batches[0])  # warm-up: allocator, kernels
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name, fn in variants.items():
            times[name].append(timed(fn))
    median = {name: statistics.median(t) for name, t in times.items()}
    return {
        "model": (f"{Path(args.config).name}{' with ' + args.override if args.override else ''}, random weights, {args.dtype}"
                  if args.config else "random Llama, hidden 768, 12 layers, 12 heads / 4 KV, ffn 2048, vocab 32000, tied, float32"),
        "params": sum(p.numel() for p in model.parameters()),
        "tokens": blocks.numel(),
        "seconds": times,
        "median_seconds": median,
        "importance_over_forward": median["importance"] / median["forward"],
        "importance_over_decoder": median["importance"] / median["decoder"],
        "tokens_per_second": {name: blocks.numel() / m for name, m in median.items()},
    }


def child(mode: str, checkpoint: str, args) -> dict:
    """One mode in this (fresh) process: time, peak RSS, and the scores for comparison."""
    from transformers import AutoModelForCausalLM

    from minitron.importance import compute_scores, score_checkpoint

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    blocks = calibration(args.samples, args.seq_len)
    baseline_rss = peak_rss()
    start = time.perf_counter()
    options = dict(batch_size=args.batch_size, show_progress=False)
    if mode == "streamed":
        scores = score_checkpoint(checkpoint, blocks, device=device, **options)
    elif mode == "layer-by-layer":
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)  # stays on the CPU
        scores = compute_scores(model, blocks, offload=True, device=device, **options)
    else:
        model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).to(device)
        scores = compute_scores(model, blocks, **options)
    seconds = time.perf_counter() - start
    scores.save(Path(checkpoint).parent / f"{mode}.safetensors", overwrite=True)
    out = {"seconds": seconds, "peak_rss_mib": peak_rss() / 2**20, "rss_before_mib": baseline_rss / 2**20}
    if device.type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return out


def peak_rss() -> int:
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec,
    # so a child would report the parent's (model-holding) peak.
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory(args) -> dict:
    from minitron.importance import Scores

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = Path(tmp) / "llama-100m"
        llama_100m().save_pretrained(checkpoint)
        runs = {}
        for mode in ("whole-model", "layer-by-layer", "streamed"):
            result = subprocess.run(
                [sys.executable, __file__, "--child", mode, "--checkpoint", str(checkpoint), *forwarded(args)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            runs[mode] = json.loads(result.stdout.strip().splitlines()[-1])
        scores = {mode: Scores.load(Path(tmp) / f"{mode}.safetensors") for mode in runs}
        whole = scores["whole-model"]
        for mode in runs:
            runs[mode]["max_abs_diff_vs_whole"] = max(
                float((whole[k] - scores[mode][k]).abs().max()) for k in whole.tensors
            )
        runs["checkpoint_mib"] = sum(f.stat().st_size for f in checkpoint.glob("*.safetensors")) / 2**20
    return runs


def forwarded(args) -> list[str]:
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items() if k in FORWARDED]


FORWARDED = ("threads", "samples", "seq_len", "batch_size", "device")


def markdown(result: dict) -> str:
    s, m = result["speed"], result.get("memory")
    med = s["median_seconds"]
    lines = [
        "# Importance pass speed and layer-by-layer memory",
        "",
        f"Machine: {result['machine']}. Shared with other jobs (load average at start "
        f"{result['load_average'][0]:.1f}); variants interleaved, {result['args']['repeats']} repeats, medians.",
        f"Model: {s.get('model', 'random Llama')}, {s['params'] / 1e6:,.0f}M parameters. Calibration: "
        f"{result['args']['samples']} × {result['args']['seq_len']} tokens, batch {result['args']['batch_size']}. "
        f"Command: `{result['command']}`",
        "",
        "| pass | median s | tokens/s | vs forward |",
        "|---|---:|---:|---:|",
    ]
    for name in ("forward", "decoder", "importance"):
        lines.append(
            f"| {name} | {med[name]:.2f} | {s['tokens_per_second'][name]:.0f} | {med[name] / med['forward']:.3f}× |"
        )
    goal = "met" if s["importance_over_forward"] <= 1.10 else "NOT met"
    lines += [
        "",
        f"Importance / plain forward = **{s['importance_over_forward']:.3f}×** (goal ≤ 1.10×: {goal}); "
        f"importance / decoder-only forward (the same layers, no output head) = {s['importance_over_decoder']:.3f}×.",
    ]
    if m is None:
        return "\n".join(lines) + "\n"
    lines += [
        "",
        "| mode | seconds | peak RSS MiB | RSS before MiB | max |Δ| vs whole |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in ("whole-model", "layer-by-layer", "streamed"):
        r = m[mode]
        lines.append(
            f"| {mode} | {r['seconds']:.2f} | {r['peak_rss_mib']:.0f} | {r['rss_before_mib']:.0f} | "
            f"{r['max_abs_diff_vs_whole']:.2e} |"
        )
    lines += [
        "",
        f"Checkpoint on disk: {m['checkpoint_mib']:.0f} MiB. Layer-by-layer on a CPU-only machine keeps the "
        "model in the same RAM (it saves device memory when a GPU runs the layers); streamed holds the "
        "embeddings, the final norm and one layer's weights.",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--config", default=None, help="model folder whose config.json gives the shape (speed part)")
    parser.add_argument("--override", default="", help="with --config: key=value,... config changes (values in JSON)")
    parser.add_argument("--dtype", default="float32", help="with --config: the weights' dtype")
    parser.add_argument("--parts", default="speed,memory", help="speed, memory or both")
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    parser.add_argument("--note", default="", help="what else the machine was doing (goes into the results)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--checkpoint", help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args.checkpoint, args)))
        return
    versions = "" if args.device.startswith("cuda") else f", torch {torch.__version__}"  # describe() names them for a GPU
    result = {
        "machine": f"{machine.describe(args.device)}{versions}, torch threads {args.threads}"
        + (f"; {args.note}" if args.note else ""),
        "load_average": os.getloadavg(),
        "command": " ".join(["python", "benchmarks/importance_speed.py", *sys.argv[1:]]),
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()} | {"child": None, "checkpoint": None},
        "speed": speed(args),
    }
    if "memory" in args.parts.split(","):
        result["memory"] = memory(args)
    stem = args.out or RESULTS / "importance_speed"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()

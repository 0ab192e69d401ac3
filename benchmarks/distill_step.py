"""Distillation step benchmark: tokens/s, model FLOPs utilisation and peak memory of one optimizer step.

It times the very step ``minitron distill`` runs (``minitron.distill.train_step`` + AdamW step on a
:class:`~minitron.distill.Distiller`), on random-weight Granite models of a given shape, in two variants:

* ``chunked``: the trainer as shipped: fused, chunked output-head losses (``minitron.losses``), never
  materialising full-vocabulary logits;
* ``naive``: the same pair, but the KD loss on full logits from both models' ``forward`` (what one writes
  with a plain ``model(...).logits``), to show what chunking saves.

Each variant runs in its own process so that peak memory is its own: ``torch.cuda.max_memory_allocated``
on a GPU, the resident-set high-water mark (``VmHWM``) on CPU.

MFU counts model FLOPs the PaLM way (appendix B): per token, 6·N + 12·L·d_attn·seq for the student
(forward + backward) and 2·N + 4·L·d_attn·seq for the teacher (forward only), N being the matmul
parameters (non-embedding + output head); recomputation (activation checkpointing) is not counted. The
peak is the dense bf16 Tensor-Core rate of the GPU (989 TFLOP/s for H100 / H200 SXM, 312 for A100), or
``--peak-tflops``; on CPU only the achieved rate is reported.

Run by hand, never as a test:

    # GPU, the issue's shape: Granite-3.1-2B-shaped teacher → ~1B-shaped student, bf16, seq 4096
    python benchmarks/distill_step.py --device cuda
    # CPU proof run at small shapes (what benchmarks/results/distill_step.md holds)
    python benchmarks/distill_step.py --device cpu --teacher 512,1536,4,8,4 --student 384,1024,2,6,2 \\
        --seq-len 256 --micro 2 --steps 3

Results go to ``benchmarks/results/distill_step_{cpu,cuda}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"
# hidden, ffn, layers, heads, kv_heads (head_dim = hidden / heads), as in the Granite-3.1 configs.
GRANITE_2B = "2048,8192,40,32,8"
STUDENT_1B = "1536,6144,24,24,8"  # the 2B pruned in width and depth: ~0.9B parameters
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}


def granite(shape: str, vocab: int, seq_len: int):
    from transformers import GraniteConfig

    hidden, ffn, layers, heads, kv_heads = map(int, shape.split(","))
    return GraniteConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / (hidden // heads),
        logits_scaling=8.0, tie_word_embeddings=True,
    )  # fmt: skip


def model_flops_per_token(student_config, teacher_config, seq_len: int) -> float:
    from minitron.families import Shape

    def parts(config):
        shape = Shape.from_config(config)
        counts = shape.counts()
        matmul = counts["non_embedding"] + shape.vocab * shape.hidden  # the head multiplies even when tied
        return matmul, shape.layers * shape.heads * shape.head_dim * seq_len

    student, s_attn = parts(student_config)
    teacher, t_attn = parts(teacher_config)
    return 6 * student + 12 * s_attn + 2 * teacher + 4 * t_attn


# --- worker: one variant in a fresh process -------------------------------------------------------------------


def worker(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from minitron.distill import Distiller, World, make_optimizer, train_step
    from minitron.losses import naive_forward_kl
    from minitron.recipe import validate

    class NaiveDistiller(Distiller):
        """The same pair with full logits from ``forward``: the memory a plain KD loss needs."""

        def forward(self, input_ids, *, normalizer, with_lm):
            inputs = input_ids[:, :-1]
            student = self.student(input_ids=inputs, use_cache=False).logits  # logits_scaling applied by HF
            with torch.no_grad():
                teacher = self.teacher(input_ids=inputs, use_cache=False).logits
            kd = naive_forward_kl(student, teacher, temperature=self.loss.temperature, normalizer=normalizer)
            return {"total": kd, "kd": kd.detach()}

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    world = World(rank=0, size=1, device=device)
    recipe = validate({
        "teacher": {"path": "random"}, "student": {"path": "random", "activation_checkpointing": args.checkpointing},
        "data": {"source": "random.txt", "seq_len": args.seq_len + 1},
        "loss": {"kd": 1.0, "chunk_size": args.chunk_size},
        "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "schedule": "constant"},
        "batch": {"micro": args.micro, "global": args.micro}, "budget": {"steps": args.steps + 1},
        "precision": args.precision, "output": {"dir": "unused"},
    })  # fmt: skip
    teacher_config = granite(args.teacher, args.vocab, args.seq_len + 1)
    student_config = granite(args.student, args.vocab, args.seq_len + 1)
    torch.manual_seed(0)
    with device:
        teacher = AutoModelForCausalLM.from_config(
            teacher_config, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32
        )
        student = AutoModelForCausalLM.from_config(student_config, dtype=torch.float32)
    if args.checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    cls = NaiveDistiller if args.worker == "naive" else Distiller
    model = cls(student, teacher, recipe).to(device).train()
    optimizer, _ = make_optimizer(model, recipe.optimizer, recipe.steps())
    batch = torch.randint(0, args.vocab, (args.micro, args.seq_len + 1), generator=torch.Generator().manual_seed(0))

    memory = _Memory(torch, device)
    times, losses = [], []
    for step in range(args.steps + 1):  # step 0 warms up (allocator, kernels)
        if step == 1:
            memory.start()
        _sync(torch, device)
        start = time.perf_counter()
        stats = train_step(model, optimizer, [batch], recipe, world)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        _sync(torch, device)
        if step:
            times.append(time.perf_counter() - start)
        losses.append(stats["loss"])
    seconds = statistics.median(times)
    tokens = args.micro * args.seq_len
    flops = model_flops_per_token(student_config, teacher_config, args.seq_len) * tokens
    peak = args.peak_tflops or _gpu_peak(torch, device)
    return {
        "variant": args.worker,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "achieved_tflops": flops / seconds / 1e12,
        "mfu": flops / seconds / (peak * 1e12) if peak else None,
        "peak_memory_gib": memory.peak() / 2**30,
        "first_loss": losses[0],
    }


def _sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gpu_peak(torch, device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


class _Memory:
    """Peak memory since :meth:`start`: allocator peak on GPU, process high-water mark on CPU."""

    def __init__(self, torch, device):
        self.torch, self.device = torch, device

    def start(self):
        if self.device.type == "cuda":
            self.torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current resident set (Linux ≥ 4.0)

    def peak(self) -> int:
        if self.device.type == "cuda":
            return self.torch.cuda.max_memory_allocated(self.device)
        status = Path("/proc/self/status").read_text()
        return next(int(line.split()[1]) * 1024 for line in status.splitlines() if line.startswith("VmHWM"))


# --- parent: run the variants, write the results ------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--teacher", default=GRANITE_2B, help="hidden,ffn,layers,heads,kv_heads")
    parser.add_argument("--student", default=STUDENT_1B, help="hidden,ffn,layers,heads,kv_heads")
    parser.add_argument("--vocab", type=int, default=49155)
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=1, help="sequences per step")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--checkpointing", action="store_true", help="student activation checkpointing")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (bf16 dense)")
    parser.add_argument("--variants", default="chunked,naive")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return

    rows = []
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
        env = {**os.environ, "PYTHONPATH": str(ROOT), "TRANSFORMERS_VERBOSITY": "error"}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            # An out-of-memory naive run is a result too: it is what the chunked loss avoids.
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            rows.append({"variant": variant, "error": tail})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
    _write(args, rows)


def _write(args, rows) -> None:
    import torch

    RESULTS.mkdir(exist_ok=True)
    name = f"distill_step_{'cuda' if args.device.startswith('cuda') else 'cpu'}"
    setup = {k: v for k, v in vars(args).items() if k not in ("worker", "variants")}
    record = {"machine": f"{machine.describe(args.device)}, torch {torch.__version__}", "setup": setup, "results": rows}
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = [
        f"# Distillation step: {args.teacher} teacher → {args.student} student (hidden,ffn,layers,heads,kv)",
        "",
        f"Machine: {record['machine']}. Vocab {args.vocab}, {args.micro} × {args.seq_len} tokens a step, "
        f"{args.precision}, chunk {args.chunk_size}, activation checkpointing {'on' if args.checkpointing else 'off'}, "
        f"{args.threads} CPU threads; median of {args.steps} steps after one warm-up, each variant in its own process.",
        "",
        "| variant | step (s) | tokens/s | achieved TFLOP/s | MFU | peak memory (GiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['variant']} | failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (no peak for a CPU)"
        lines.append(
            f"| {r['variant']} | {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.3f} | {mfu} "
            f"| {r['peak_memory_gib']:.2f} |"
        )
    (RESULTS / f"{name}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

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

The GPU suite (``benchmarks/gpu/run.sh``) runs the real shapes: ``--teacher``/``--student`` also take a
model folder (``config.json``, e.g. ``benchmarks/gpu/models/llama-3.1-8b``, random weights built from it) and
``--sweep`` times several ``seq:micro:checkpointing`` settings in one process that builds the pair once
(CUDA peak memory is reset between settings; a setting that runs out of memory is a result, and the next
one runs). ``--profile`` then profiles one step of the best setting with ``torch.profiler`` and lists the
top GPU kernels and their share by kind (matrix products, attention, element-wise, optimizer), which says
what limits the MFU.

Run by hand, never as a test:

    # GPU, the issue's shape: Granite-3.1-2B-shaped teacher → ~1B-shaped student, bf16, seq 4096
    python benchmarks/distill_step.py --device cuda
    # CPU proof run at small shapes (what benchmarks/results/distill_step.md holds)
    python benchmarks/distill_step.py --device cpu --teacher 512,1536,4,8,4 --student 384,1024,2,6,2 \\
        --seq-len 256 --micro 2 --steps 3

    # GPU, Llama-3.1-8B → Minitron-4B-Width, several settings in one process, then a profile
    python benchmarks/distill_step.py --device cuda --teacher benchmarks/gpu/models/llama-3.1-8b \\
        --student benchmarks/gpu/models/llama-3.1-minitron-4b-width --sweep 4096:1:off,4096:1:on,8192:1:on --profile

Results go to ``benchmarks/results/distill_step_{cpu,cuda}.{json,md}``, or ``--out STEM`` (``STEM.json``,
``STEM.md``), rewritten after each setting so that a run stopped half-way leaves what it measured.
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
FORMULA = (
    "model FLOPs per token = 6·N_s + 12·L_s·d_s·T (student forward + backward) + 2·N_t + 4·L_t·d_t·T "
    "(teacher forward), N = matmul parameters (non-embedding + output head), L = layers, d = heads × head_dim, "
    "T = sequence length; recomputation not counted; MFU = model FLOPs / step time / peak dense bf16 rate"
)


def granite(shape: str, vocab: int, seq_len: int):
    from transformers import GraniteConfig

    hidden, ffn, layers, heads, kv_heads = map(int, shape.split(","))
    return GraniteConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=seq_len,
        embedding_multiplier=12.0, residual_multiplier=0.22, attention_multiplier=1 / (hidden // heads),
        logits_scaling=8.0, tie_word_embeddings=True,
    )  # fmt: skip


def model_config(spec: str, vocab: int, seq_len: int, overrides: str = ""):
    """A Granite of ``hidden,ffn,layers,heads,kv_heads``, or the config of a model folder; then ``key=value`` overrides."""
    if Path(spec).exists():
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(spec)
    else:
        config = granite(spec, vocab, seq_len)
    for item in filter(None, overrides.split(",")):
        key, value = item.split("=", 1)
        setattr(config, key, json.loads(value))
    config.max_position_embeddings = max(config.max_position_embeddings, seq_len)
    config.use_cache = False
    return config


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


def parse_sweep(text: str) -> list[tuple[int, int, bool]]:
    """``4096:1:off,8192:1:on`` → [(seq, micro, checkpointing)]."""
    settings = []
    for item in filter(None, text.split(",")):
        seq, micro, ckpt = item.split(":")
        settings.append((int(seq), int(micro), ckpt == "on"))
    return settings


# --- worker: the pair built once, one or several settings timed -----------------------------------------------


class Bench:
    """A teacher-student pair, its optimizer and one setting's timing, in this process."""

    def __init__(self, args, max_seq: int, naive: bool = False):
        import torch
        from transformers import AutoModelForCausalLM

        from minitron.distill import Distiller, make_optimizer
        from minitron.distill_data import World
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

        self.torch, self.args = torch, args
        torch.set_num_threads(args.threads)
        self.device = torch.device(args.device)
        self.world = World(rank=0, size=1, device=self.device)
        self.recipe = validate({
            "teacher": {"path": "random"}, "student": {"path": "random"},
            "data": {"source": "random.txt", "seq_len": max_seq + 1},
            "loss": {"kd": 1.0, "chunk_size": args.chunk_size},
            "optimizer": {"lr": 1e-5, "min_lr": 1e-5, "schedule": "constant"},
            "batch": {"micro": 1, "global": 1}, "budget": {"steps": 1000},
            "precision": args.precision, "output": {"dir": "unused"},
        })  # fmt: skip
        self.teacher_config = model_config(args.teacher, args.vocab, max_seq + 1, args.teacher_override)
        self.student_config = model_config(args.student, args.vocab, max_seq + 1, args.student_override)
        self.vocab = self.student_config.vocab_size
        torch.manual_seed(0)
        with self.device:
            teacher = AutoModelForCausalLM.from_config(
                self.teacher_config, dtype=torch.bfloat16 if args.precision == "bf16" else torch.float32
            )
            student = AutoModelForCausalLM.from_config(self.student_config, dtype=torch.float32)
        self.student = student
        self.model = (NaiveDistiller if naive else Distiller)(student, teacher, self.recipe).to(self.device).train()
        self.optimizer, _ = make_optimizer(self.model, self.recipe.optimizer, 1000)
        self.memory = _Memory(torch, self.device)

    def checkpointing(self, on: bool) -> None:
        if on:
            self.student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        else:
            self.student.gradient_checkpointing_disable()
        self.model.train()

    def step(self, batch) -> float:
        from minitron.distill import train_step

        stats = train_step(self.model, self.optimizer, [batch], self.recipe, self.world)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return stats["loss"]

    def batch(self, seq_len: int, micro: int):
        return self.torch.randint(0, self.vocab, (micro, seq_len + 1), generator=self.torch.Generator().manual_seed(0))

    def run(self, seq_len: int, micro: int, checkpointing: bool, steps: int) -> dict:
        torch = self.torch
        self.checkpointing(checkpointing)
        batch = self.batch(seq_len, micro)
        times, losses = [], []
        for step in range(steps + 1):  # step 0 warms up (allocator, kernels)
            if step == 1:
                self.memory.start()
            _sync(torch, self.device)
            start = time.perf_counter()
            losses.append(self.step(batch))
            _sync(torch, self.device)
            if step:
                times.append(time.perf_counter() - start)
        seconds = statistics.median(times)
        tokens = micro * seq_len
        flops = model_flops_per_token(self.student_config, self.teacher_config, seq_len) * tokens
        peak = self.args.peak_tflops or _gpu_peak(torch, self.device)
        return {
            "seq_len": seq_len,
            "micro": micro,
            "checkpointing": checkpointing,
            "step_s": seconds,
            "all_step_s": times,
            "tokens_per_s": tokens / seconds,
            "achieved_tflops": flops / seconds / 1e12,
            "mfu": flops / seconds / (peak * 1e12) if peak else None,
            "peak_memory_gib": self.memory.peak() / 2**30,
            "first_loss": losses[0],
            "last_loss": losses[-1],
        }

    def profile(self, seq_len: int, micro: int, checkpointing: bool, top: int = 15) -> dict:
        """One profiled step: the top kernels (GPU) or operators (CPU) by their own time, and shares by kind."""
        from torch.profiler import ProfilerActivity, profile

        torch = self.torch
        cuda = self.device.type == "cuda"
        self.checkpointing(checkpointing)
        batch = self.batch(seq_len, micro)
        self.step(batch)  # warm
        _sync(torch, self.device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        start = time.perf_counter()
        with profile(activities=activities) as prof:
            self.step(batch)
            _sync(torch, self.device)
        wall = time.perf_counter() - start
        from torch.autograd import DeviceType

        rows = []
        for event in prof.key_averages():
            # On a GPU the kernels are events of their own (device type CUDA); the CPU-side operators that
            # launched them carry the same time again, so they are left out.
            if cuda and getattr(event, "device_type", None) != DeviceType.CUDA:
                continue
            own = event.self_device_time_total if cuda else event.self_cpu_time_total
            if own > 0:
                rows.append({"name": event.key, "calls": event.count, "ms": own / 1e3})
        total = sum(r["ms"] for r in rows)
        rows.sort(key=lambda r: -r["ms"])
        kinds: dict[str, float] = {}
        for r in rows:
            r["share"] = r["ms"] / total if total else 0.0
            r["kind"] = kernel_kind(r["name"])
            kinds[r["kind"]] = kinds.get(r["kind"], 0.0) + r["ms"]
        return {
            "seq_len": seq_len, "micro": micro, "checkpointing": checkpointing, "wall_s": wall,
            "what": "GPU kernels, self device time" if cuda else "CPU operators, self CPU time",
            "total_ms": total, "kinds": {k: {"ms": v, "share": v / total if total else 0.0} for k, v in
                                          sorted(kinds.items(), key=lambda kv: -kv[1])},
            "top": rows[:top],
        }  # fmt: skip


KINDS = (  # first match wins; names of cuBLAS/CUTLASS/flash kernels and of aten's own
    ("matrix products", ("gemm", "cutlass", "xmma", "nvjet", "cublas", "matmul", "aten::mm", "aten::addmm", "aten::bmm", "wgmma")),
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("optimizer", ("multi_tensor", "adam", "foreach")),
    ("softmax / norms / reductions", ("softmax", "norm", "reduce", "aten::sum", "aten::mean", "logsumexp")),
    ("copies and casts", ("copy", "cast", "memcpy", "memset", "fill", "aten::to", "cat")),
    ("element-wise", ("elementwise", "vectorized", "unrolled", "aten::mul", "aten::add", "aten::silu")),
)  # fmt: skip


def kernel_kind(name: str) -> str:
    low = name.lower()
    return next((kind for kind, keys in KINDS if any(k in low for k in keys)), "other")


def worker(args) -> dict:
    bench = Bench(args, args.seq_len, naive=args.worker == "naive")
    return {"variant": args.worker, **bench.run(args.seq_len, args.micro, args.checkpointing, args.steps)}


def sweep_worker(args) -> None:
    """Every ``--sweep`` setting on one pair; a ``RESULT`` line per setting, then ``PROFILE``."""
    import torch

    settings = parse_sweep(args.sweep)
    bench = Bench(args, max(seq for seq, _, _ in settings))
    done = []
    for seq, micro, ckpt in settings:
        try:
            row = {"variant": "chunked", **bench.run(seq, micro, ckpt, args.steps)}
        except torch.OutOfMemoryError as error:
            row = {"variant": "chunked", "seq_len": seq, "micro": micro, "checkpointing": ckpt,
                   "error": "out of memory: " + str(error).split(".")[0]}  # fmt: skip
        bench.optimizer.zero_grad(set_to_none=True)
        if bench.device.type == "cuda":
            torch.cuda.empty_cache()
        done.append(row)
        print("RESULT " + json.dumps(row), flush=True)
    ran = [r for r in done if "error" not in r]
    if args.profile and ran:
        best = max(ran, key=lambda r: r["tokens_per_s"])
        try:
            profile = bench.profile(best["seq_len"], best["micro"], best["checkpointing"])
        except Exception as error:  # noqa: BLE001 - the timings above stand without it
            profile = {"error": f"{type(error).__name__}: {error}"}
        print("PROFILE " + json.dumps(profile), flush=True)


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
    parser.add_argument("--teacher", default=GRANITE_2B, help="hidden,ffn,layers,heads,kv_heads (Granite), or a model folder")
    parser.add_argument("--student", default=STUDENT_1B, help="hidden,ffn,layers,heads,kv_heads (Granite), or a model folder")
    parser.add_argument("--teacher-override", default="", help="config changes, key=value,... (values in JSON)")
    parser.add_argument("--student-override", default="", help="config changes, key=value,... (values in JSON)")
    parser.add_argument("--vocab", type=int, default=49155, help="vocabulary of the Granite shapes")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--micro", type=int, default=1, help="sequences per step")
    parser.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--checkpointing", action="store_true", help="student activation checkpointing")
    parser.add_argument("--sweep", default="", help="seq:micro:on|off,... settings timed in one process (chunked only)")
    parser.add_argument("--profile", action="store_true", help="with --sweep: profile one step of the fastest setting")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--threads", type=int, default=2, help="CPU threads")
    parser.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (bf16 dense)")
    parser.add_argument("--variants", default="chunked,naive")
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    parser.add_argument("--note", default="", help="what else the machine was doing (goes into the results)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker == "sweep":
        sweep_worker(args)
        return
    if args.worker:
        print(json.dumps(worker(args)))
        return

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "TRANSFORMERS_VERBOSITY": "error"}  # fmt: skip
    if args.device.startswith("cuda"):
        env.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")  # settings of several sizes, one process
    rows, profile = [], None
    if args.sweep:
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", "sweep"]
        with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as proc:
            for line in proc.stdout:
                if line.startswith("RESULT "):
                    rows.append(json.loads(line[len("RESULT ") :]))
                    print(json.dumps(rows[-1]), flush=True)
                elif line.startswith("PROFILE "):
                    profile = json.loads(line[len("PROFILE ") :])
                _write(args, rows, profile)  # after each setting: a stopped run leaves what it measured
            stderr = proc.stderr.read()
        if proc.returncode != 0:
            tail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {proc.returncode}"
            rows.append({"variant": "sweep", "error": tail})
            _write(args, rows, profile)
            print(stderr[-3000:], file=sys.stderr)
            raise SystemExit(1)
        return
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, *sys.argv[1:], "--worker", variant]
        done = subprocess.run(command, capture_output=True, text=True, env=env)
        if done.returncode != 0:
            # An out-of-memory naive run is a result too: it is what the chunked loss avoids.
            tail = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit {done.returncode}"
            rows.append({"variant": variant, "error": tail})
        else:
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(json.dumps(rows[-1]))
        _write(args, rows, None)


def _write(args, rows, profile) -> None:
    import torch

    cuda = args.device.startswith("cuda")
    stem = args.out or RESULTS / f"distill_step_{'cuda' if cuda else 'cpu'}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    setup = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "variants")}
    versions = "" if cuda else f", torch {torch.__version__}"  # describe() names them for a GPU
    record = {"machine": f"{machine.describe(args.device)}{versions}" + (f"; {args.note}" if args.note else ""),
              "formula": FORMULA, "setup": setup, "results": rows, "profile": profile}  # fmt: skip
    stem.with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    sweep = bool(args.sweep)
    lines = [
        f"# Distillation step: {Path(args.teacher).name} teacher → {Path(args.student).name} student",
        "",
        f"Machine: {record['machine']}. {args.precision}, chunk {args.chunk_size}, {args.threads} CPU threads; "
        f"median of {args.steps} steps after one warm-up, "
        + ("all settings in one process (the pair built once)." if sweep else
           f"{args.micro} × {args.seq_len} tokens a step, activation checkpointing "
           f"{'on' if args.checkpointing else 'off'}, each variant in its own process."),
        "",
        f"MFU: {FORMULA}.",
        "",
        "| variant | seq | micro | checkpointing | step (s) | tokens/s | achieved TFLOP/s | MFU | peak memory (GiB) |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|",
    ]  # fmt: skip
    for r in rows:
        where = (f"| {r['variant']} | {r.get('seq_len', args.seq_len)} | {r.get('micro', args.micro)} | "
                 f"{'on' if r.get('checkpointing', args.checkpointing) else 'off'} |")  # fmt: skip
        if "error" in r:
            lines.append(f"{where} failed: {r['error']} | | | | |")
            continue
        mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (CPU)"
        lines.append(f"{where} {r['step_s']:.3f} | {r['tokens_per_s']:,.0f} | {r['achieved_tflops']:.3f} | {mfu} "
                     f"| {r['peak_memory_gib']:.2f} |")  # fmt: skip
    if profile and "error" in profile:
        lines += ["", f"Profile failed: {profile['error']}"]
    elif profile:
        lines += [
            "",
            f"## Profile of one step: seq {profile['seq_len']}, micro {profile['micro']}, checkpointing "
            f"{'on' if profile['checkpointing'] else 'off'} ({profile['what']}; {profile['total_ms']:.1f} ms in all, "
            f"step {profile['wall_s']:.3f} s under the profiler)",
            "",
            "| kind | ms | share |",
            "|---|---:|---:|",
            *[f"| {k} | {v['ms']:.1f} | {100 * v['share']:.1f}% |" for k, v in profile["kinds"].items()],
            "",
            "| kernel | kind | calls | ms | share |",
            "|---|---|---:|---:|---:|",
            *[f"| `{r['name'][:90]}` | {r['kind']} | {r['calls']} | {r['ms']:.1f} | {100 * r['share']:.1f}% |"
              for r in profile["top"]],
        ]  # fmt: skip
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

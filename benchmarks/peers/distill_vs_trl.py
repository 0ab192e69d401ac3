"""Distillation throughput and memory beside TRL's GKD trainer: same models, data, steps and optimizer.

Both tools train the same random-weight Llama student from the same random-weight Llama teacher, both with
a Llama-3-sized vocabulary (128,256) and small hidden sizes so that a CPU finishes:

* **minitron**: ``minitron distill RECIPE`` as a user runs it: forward KL at τ = 1, no LM loss, the
  chunked fused loss (full-vocabulary logits never materialised);
* **TRL**: ``trl.experimental.gkd.GKDTrainer`` with ``lmbda=0`` (``random.random() <= lmbda`` never holds:
  no on-policy student generation), ``seq_kd=False`` (no teacher generation) and ``beta=0`` (its
  ``generalized_jsd_loss`` then computes ``F.kl_div(student_log_probs, teacher_log_probs,
  log_target=True)`` = KL(teacher‖student), forward KL; the loss is always taken at temperature 1, its
  ``temperature`` only samples). TRL's newer ``DistillationTrainer`` has a chunked loss but always samples
  completions on-policy, so it cannot run this recipe.

The same: sequence length, micro-batch (no accumulation), fp32 on CPU, AdamW (β = 0.9/0.95, ε = 1e-8, no
weight decay, constant LR, gradient clipping at 1.0), no activation checkpointing, no dropout, seed, and
the very same batches in the same order (TRL's worker reads minitron's token cache with
``minitron.distill_data.packed_blocks`` and ``Blocks`` and feeds them in order). Step 1's loss must agree to
rounding: same student, same batch.

Measured per run: tokens per second (median step after the first: the loop's wall time between the ends
of consecutive optimizer steps, data included), the process's peak resident set (``wait4``'s
``ru_maxrss``: imports, both models, the optimizer state, the step), and the loss per step. Runs alternate
the two tools (minitron, TRL, TRL, minitron, …) so a shared machine's load hits both alike; the table
gives medians over ``--repeats``.

Run by hand, never as a test:

    pip install -e '.[peers]'
    python benchmarks/peers/distill_vs_trl.py --threads 1   # what results/peers_distill_cpu.md holds

Without ``--work DIR`` (which keeps the fixture and every run's output) it works in a temporary folder,
removed when the run ends however it ends (``kill -9`` aside).

Results: ``benchmarks/results/peers_distill_{cpu,cuda}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import common
import machine  # benchmarks/machine.py, on sys.path once common is imported

# the repository root is on sys.path once common is imported
from minitron.errors import UserError, run_script

# hidden, ffn, layers, heads, kv_heads (head_dim 32)
TEACHER = "256,768,4,8,2"
STUDENT = "128,384,2,4,2"


# --- the fixture: models, tokenizer, text ------------------------------------------------------------------


def build_fixture(work: Path, args) -> dict:
    """Random teacher and student checkpoints sharing a 128,256-word tokenizer, and random text for it."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<eos>": 0, **{f"t{i}": i for i in range(1, args.vocab)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<eos>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<eos>")
    paths = {}
    for name, shape, seed in (("teacher", args.teacher, 1), ("student", args.student, 2)):
        hidden, ffn, layers, heads, kv = sizes(f"--{name}", shape)
        config = LlamaConfig(
            vocab_size=args.vocab, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads,
            max_position_embeddings=args.seq_len, tie_word_embeddings=False, initializer_range=0.1,
            bos_token_id=0, eos_token_id=0, pad_token_id=0,
        )  # fmt: skip
        torch.manual_seed(seed)
        paths[name] = work / name
        LlamaForCausalLM(config).save_pretrained(paths[name])
        tokenizer.save_pretrained(paths[name])
    generator = torch.Generator().manual_seed(0)
    blocks_needed = args.steps * args.micro + 2 + 8  # training + held-out blocks + spare
    words = blocks_needed * args.seq_len
    text = work / "text.jsonl"
    with text.open("w") as f:
        for ids in torch.randint(1, args.vocab, (words // 500 + 1, 500), generator=generator).tolist():
            f.write(json.dumps({"text": " ".join(f"t{i}" for i in ids)}) + "\n")
    return {"teacher": paths["teacher"], "student": paths["student"], "text": text, "cache": work / "cache"}


def recipe(fixture: dict, run: Path, args) -> dict:
    return {
        "teacher": {"path": str(fixture["teacher"])},
        "student": {"path": str(fixture["student"])},
        "data": {"source": str(fixture["text"]), "seq_len": args.seq_len, "cache_dir": str(fixture["cache"])},
        "loss": {"kd": 1.0, "temperature": 1.0, "lm": 0.0, "chunk_size": args.chunk_size},
        "optimizer": {"lr": args.lr, "schedule": "constant", "warmup_steps": 0, "weight_decay": 0.0,
                      "betas": [0.9, 0.95], "eps": 1e-8, "grad_clip": 1.0},
        "batch": {"micro": args.micro, "global": args.micro},
        "budget": {"steps": args.steps},
        "precision": "fp32",
        "eval": {"every": 0, "blocks": 2},
        "checkpoint": {"every": 0},
        "output": {"dir": str(run)},
        "seed": 0,
    }  # fmt: skip


# --- the two runs ---------------------------------------------------------------------------------------------


def run_minitron(fixture: dict, run: Path, args) -> dict:
    import yaml

    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe(fixture, run, args), sort_keys=False))
    done = common.run_child([sys.executable, "-m", "minitron.cli", "distill", str(path)], log=run.parent / f"{run.name}.log")
    if done["rc"]:
        raise RuntimeError(f"minitron distill failed: {(run.parent / f'{run.name}.log').read_text()[-2000:]}")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in records if "tokens_per_s" in r]
    tokens = args.micro * args.seq_len
    return {**done, "step_s": [tokens / r["tokens_per_s"] for r in steps], "loss": [r["kl"] for r in steps]}


def run_trl(fixture: dict, run: Path, args) -> dict:
    out = run.parent / f"{run.name}.json"
    command = [sys.executable, __file__, *sys.argv[1:], "--worker", str(run), "--fixture", json.dumps({k: str(v) for k, v in fixture.items()})]
    done = common.run_child(command, log=run.parent / f"{run.name}.log")
    if done["rc"]:
        raise RuntimeError(f"TRL worker failed: {(run.parent / f'{run.name}.log').read_text()[-3000:]}")
    return {**done, **json.loads(out.read_text())}


def trl_worker(fixture: dict, run: Path, args) -> None:
    """One GKD training run in this process; writes step times and losses to ``RUN.json``."""
    import torch
    from datasets import Dataset
    from torch.utils.data import SequentialSampler
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.gkd import GKDConfig, GKDTrainer

    from minitron.distill_data import Blocks, World, packed_blocks
    from minitron.recipe import validate

    torch.manual_seed(0)
    r = validate(recipe(fixture, run, args))
    world = World(rank=0, size=1, device=torch.device("cpu"))
    tokenizer = AutoTokenizer.from_pretrained(fixture["teacher"])
    # minitron's own batches, in its order: step s reads data.step(s, …).
    data = Blocks(packed_blocks(r.data, tokenizer, world), heldout=r.eval.blocks, seed=r.seed)
    rows = [row for s in range(args.steps) for row in data.step(s, args.micro, args.micro, world)[0].tolist()]
    dataset = Dataset.from_dict({"input_ids": rows})

    def collate(examples):
        ids = torch.tensor([e["input_ids"] for e in examples])
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    class InOrder(GKDTrainer):
        def _get_train_sampler(self, *unused, **unused_kw):
            return SequentialSampler(self.train_dataset)

    class Clock(TrainerCallback):
        def __init__(self):
            self.ends, self.losses = [], []

        def on_train_begin(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())

        def on_log(self, _args, _state, _control, logs=None, **k):
            if logs and "loss" in logs:
                self.losses.append(logs["loss"])

    config = GKDConfig(
        output_dir=str(run), max_steps=args.steps, per_device_train_batch_size=args.micro,
        gradient_accumulation_steps=1, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8, max_grad_norm=1.0,
        optim="adamw_torch", bf16=False, fp16=False, use_cpu=True, gradient_checkpointing=False,
        lmbda=0.0, beta=0.0, seq_kd=False, max_length=args.seq_len, disable_dropout=True,
        logging_steps=1, save_strategy="no", report_to=[], seed=0, data_seed=0, dataloader_num_workers=0,
    )  # fmt: skip
    student = AutoModelForCausalLM.from_pretrained(fixture["student"], dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(fixture["teacher"], dtype=torch.float32)
    clock = Clock()
    trainer = InOrder(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer,
        data_collator=collate, callbacks=[clock],
    )  # fmt: skip
    trainer.train()
    step_s = [b - a for a, b in zip(clock.ends, clock.ends[1:])]
    (run.parent / f"{run.name}.json").write_text(json.dumps({"step_s": step_s, "loss": clock.losses}))


# --- parent ---------------------------------------------------------------------------------------------------


def summarise(runs: list[dict], args) -> dict:
    tokens = args.micro * args.seq_len
    speeds = [tokens / statistics.median(r["step_s"][1:]) for r in runs]
    return {
        "tokens_per_s": statistics.median(speeds),
        "tokens_per_s_runs": speeds,
        "peak_rss_mib": statistics.median(r["peak_rss_mib"] for r in runs),
        "peak_rss_mib_runs": [r["peak_rss_mib"] for r in runs],
        "first_loss": runs[0]["loss"][0],
        "last_loss": statistics.median(r["loss"][-1] for r in runs),
        "loss_curve": runs[0]["loss"],
    }


def markdown(record: dict, args) -> list[str]:
    m, t = record["summary"]["minitron"], record["summary"]["trl"]
    lines = [
        "# Distillation throughput and memory: minitron beside TRL's GKD trainer",
        "",
        machine.machine_line(record),
        "",
        f"Random-weight Llama teacher {args.teacher} → student {args.student} (hidden,ffn,layers,heads,kv; "
        f"untied), vocab {args.vocab:,}; {args.micro} × {args.seq_len} tokens a step, fp32, AdamW lr {args.lr} "
        f"constant, β 0.9/0.95, clip 1.0, {args.steps} steps, the same batches in the same order. TRL: "
        "`GKDTrainer` with lmbda 0, beta 0, seq_kd off (forward KL at τ = 1, no generation). minitron: "
        f"`minitron distill`, chunk {args.chunk_size}. {record['threads']} intra-op thread(s) each. Medians over {args.repeats} runs per tool, alternating; "
        "tokens/s from the median step after the first; peak RSS of the whole process.",
        "",
        "| tool | tokens/s | peak RSS (MiB) | loss at step 1 | loss at step "
        f"{args.steps} |",
        "|---|---|---|---|---|",
        f"| minitron | {m['tokens_per_s']:,.0f} | {m['peak_rss_mib']:,.0f} | {m['first_loss']:.5f} | {m['last_loss']:.5f} |",
        f"| TRL GKD | {t['tokens_per_s']:,.0f} | {t['peak_rss_mib']:,.0f} | {t['first_loss']:.5f} | {t['last_loss']:.5f} |",
        "",
        f"minitron / TRL: **{m['tokens_per_s'] / t['tokens_per_s']:.2f}×** the tokens/s, "
        f"**{m['peak_rss_mib'] / t['peak_rss_mib']:.2f}×** the peak RSS.",
        "",
        "Per run (tokens/s; peak RSS MiB), in the order run: "
        + "; ".join(f"{r['tool']} {r['tokens_per_s']:,.0f}, {r['peak_rss_mib']:,.0f}" for r in record["runs"]) + ".",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=TEACHER, help="hidden,ffn,layers,heads,kv_heads")
    parser.add_argument("--student", default=STUDENT, help="hidden,ffn,layers,heads,kv_heads")
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq-len", type=int, default=513, help="tokens per block (predicted: one fewer)")
    parser.add_argument("--micro", type=int, default=1, help="sequences per step")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--chunk-size", type=int, default=128, help="minitron's loss.chunk_size (1024 ≥ the 512 tokens of a step would not chunk)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads of every run (default: torch's)")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the fixture and runs here (default: a temporary folder, removed at the end)")
    parser.add_argument("--name", default="peers_distill_cpu")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--fixture", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return trl_worker({k: Path(v) for k, v in json.loads(args.fixture).items()}, args.worker, args)

    check_args(args)
    if args.threads:
        os.environ["PEERS_THREADS"] = str(args.threads)
    with common.scratch(args.work, "peers-distill-") as work:
        record = compare(work, args)
    machine.write(args.name, record, lambda r: markdown(r, args))


def check_args(args) -> None:
    """TRL installed and every number one the runs can use, before the fixture is built."""
    common.need("trl", "TRL")
    common.at_least(args, vocab=2, seq_len=2, micro=1, steps=2, chunk_size=1, repeats=1, threads=1)
    common.positive(args, lr=0.001)
    sizes("--teacher", args.teacher)
    sizes("--student", args.student)


def sizes(flag: str, spec: str) -> tuple[int, int, int, int, int]:
    """``hidden,ffn,layers,heads,kv_heads`` read from ``spec``, or one line saying why it cannot be."""
    parts = spec.split(",")
    values = tuple(int(p) for p in parts if p.strip().isdigit())
    if len(parts) != 5 or len(values) != 5 or min(values) < 1 or values[0] % values[3] or values[3] % values[4]:
        raise UserError(
            f"cannot read {spec!r}", where=flag,
            fix="pass hidden,ffn,layers,heads,kv_heads: five whole numbers, hidden a multiple of heads and "
            "heads of kv_heads",
        )  # fmt: skip
    return values


def compare(work: Path, args) -> dict:
    """Both tools, ``--repeats`` times each, alternating, in ``work``: the results record."""
    os.environ["MINITRON_CACHE"] = str(work)  # the children's token cache and shipped-text copies, in work
    fixture = build_fixture(work, args)
    load_before = machine.load_average()
    runs = []
    for rep in range(args.repeats):
        order = ("minitron", "trl") if rep % 2 == 0 else ("trl", "minitron")
        for tool in order:
            run = work / f"{tool}-{rep}"
            result = (run_minitron if tool == "minitron" else run_trl)(fixture, run, args)
            result.update(tool=tool, repeat=rep, tokens_per_s=args.micro * args.seq_len / statistics.median(result["step_s"][1:]))
            runs.append(result)
            print(json.dumps({k: result[k] for k in ("tool", "repeat", "tokens_per_s", "peak_rss_mib", "loss")}), flush=True)
    return {
        "machine": machine.describe("cpu"),
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "versions": machine.versions("trl", "minitron"),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("worker", "fixture")},
        "threads": os.environ.get("OMP_NUM_THREADS") or args.threads or "torch default",
        "summary": {tool: summarise([r for r in runs if r["tool"] == tool], args) for tool in ("minitron", "trl")},
        "runs": runs,
    }


if __name__ == "__main__":
    run_script(main)

"""Would the bundled teacher get materially better with more training? Continue it and measure.

Run by hand (about 45 minutes on one CPU thread at the defaults); writes
``benchmarks/results/teacher_continue.{json,md}``:

    python benchmarks/teacher_continue.py --steps 1000 --threads 1

The teacher in ``minitron/assets/teacher`` was trained by ``scripts/train_teacher.py`` with a cosine schedule
that ends at a tenth of its peak learning rate, so the loss still falling at the end of that run is partly the
schedule annealing, not proof that longer training pays. This script answers the question directly: it loads
the shipped weights (bfloat16, computed in float32) and its tokenizer, continues training on the same packed
train blocks *in the order the original run would have read next* (``batch_for`` at steps after its last),
with the same AdamW settings and batch, fresh optimizer moments, a short linear re-warm-up to ``--lr`` and a
cosine back down to ``--min-lr-ratio`` of it (the usual way to continue a finished cosine run), and reports

- the 32-block valid loss every ``--eval-every`` steps (the curve on the teacher's model card);
- the whole WikiText-2 valid split scored as lm-eval's ``loglikelihood_rolling`` does, before and after,
  with the continued weights rounded to bfloat16 exactly as they would ship.

Nothing here writes a checkpoint: it measures, and ``scripts/train_teacher.py`` stays the one way to make
a teacher.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import time
from pathlib import Path

import torch

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"


def _train_teacher():
    """scripts/train_teacher.py as a module: its data packing, schedule, batch order and scoring."""
    spec = importlib.util.spec_from_file_location("train_teacher", REPO / "scripts" / "train_teacher.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=REPO / "minitron" / "assets" / "teacher")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps to continue for")
    p.add_argument("--lr", type=float, default=5e-4, help="peak learning rate of the continuation")
    p.add_argument("--min-lr-ratio", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--name", default="teacher_continue", help="results file stem under benchmarks/results/")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    tt = _train_teacher()
    torch.set_num_threads(args.threads)
    tt.hf_logging.disable_progress_bar()
    trained = json.loads((args.teacher / "training.json").read_text())
    original = tt.parse_args(tt.shlex.split(trained["command"])[2:])  # the settings the teacher was trained with

    tokenizer = tt.PreTrainedTokenizerFast.from_pretrained(args.teacher)
    model = tt.LlamaForCausalLM.from_pretrained(args.teacher, dtype=torch.float32)
    train_texts = [r["text"] for r in tt.read_articles(original.train)][: original.max_articles]
    valid = tt.read_articles(original.valid)[: original.valid_articles]
    blocks = tt.pack(tt.token_stream(tokenizer, train_texts), original.seq_len)
    quick_valid = tt.pack(tt.token_stream(tokenizer, [r["text"] for r in valid]), original.seq_len)[:32]
    done = trained["steps"]
    load_before = os.getloadavg()

    model.eval()
    start = {"quick_valid": round(tt.block_loss(model, quick_valid), 4),
             "valid": tt.perplexities(model, tokenizer, valid, original.raw_test, 0)["valid"]}
    print(f"shipped teacher: valid(32 blocks) {start['quick_valid']:.4f}, valid {start['valid']['loss']:.4f}",
          flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": original.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), eps=1e-8,
    )
    schedule = argparse.Namespace(lr=args.lr, min_lr_ratio=args.min_lr_ratio, warmup=args.warmup)
    history, seconds = [], 0.0
    model.train()
    for k in range(args.steps):
        t0 = time.time()
        lr = tt.lr_at(k, args.steps, schedule)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = tt.batch_for(done + k, blocks, original.batch, original.seed)
        loss = tt.next_token_nll(model, x) / x[:, 1:].numel()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), original.clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.time() - t0
        if (k + 1) % args.eval_every == 0 or k + 1 == args.steps:
            model.eval()
            val = tt.block_loss(model, quick_valid)
            model.train()
            history.append({"step": done + k + 1, "train_loss": round(loss.item(), 4), "valid_loss": round(val, 4),
                            "lr": lr})
            print(f"step {done + k + 1}  train {loss.item():.3f}  valid(32 blocks) {val:.4f}  "
                  f"{seconds / 60:.1f} min", flush=True)

    shipped = getattr(torch, original.save_dtype)
    model = model.to(shipped).float().eval()
    end = {"quick_valid": history[-1]["valid_loss"],
           "valid": tt.perplexities(model, tokenizer, valid, original.raw_test, 0)["valid"]}
    per_epoch = len(blocks) // original.batch
    result = {
        "teacher": str(args.teacher.relative_to(REPO) if args.teacher.is_relative_to(REPO) else args.teacher),
        "trained_steps": done,
        "trained_epochs": round(done / per_epoch, 3),
        "continued_steps": args.steps,
        "epochs_after": round((done + args.steps) / per_epoch, 3),
        "schedule": {"lr": args.lr, "min_lr_ratio": args.min_lr_ratio, "warmup": args.warmup,
                     "batch": original.batch, "seq_len": original.seq_len},
        "start": start,
        "end": end,
        "delta_valid_loss": round(end["valid"]["loss"] - start["valid"]["loss"], 4),
        "history": history,
        "seconds_per_step": round(seconds / args.steps, 3),
        "threads": args.threads,
        "machine": machine.describe(),
        "load_average": {"before": [round(v, 2) for v in load_before],
                         "after": [round(v, 2) for v in os.getloadavg()]},
        "versions": tt.versions(),
        "command": f"python benchmarks/teacher_continue.py --steps {args.steps} --lr {args.lr:g} "
                   f"--threads {args.threads}",
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (RESULTS / f"{args.name}.md").write_text(markdown(result))
    print(f"valid loss {start['valid']['loss']:.4f} → {end['valid']['loss']:.4f} "
          f"({result['delta_valid_loss']:+.4f}) after {args.steps} more steps")
    return result


def markdown(r: dict) -> str:
    s, e = r["start"]["valid"], r["end"]["valid"]
    rows = "\n".join(f"| {h['step']} | {h['lr']:.2e} | {h['train_loss']:.3f} | {h['valid_loss']:.4f} |"
                     for h in r["history"])
    return f"""# Continuing the bundled teacher's training

`{r['command']}`

Machine: {r['machine']}; torch {r['threads']} thread(s); load average {r['load_average']['before']} before,
{r['load_average']['after']} after. Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.

`{r['teacher']}` was trained for {r['trained_steps']:,} steps ({r['trained_epochs']} epochs of its WikiText-2 train
text). Continued here for {r['continued_steps']:,} more steps (to {r['epochs_after']} epochs) in the order the original
run would have read next: batch {r['schedule']['batch']} × {r['schedule']['seq_len']} tokens, AdamW with the original
settings and fresh moments, linear re-warm-up over {r['schedule']['warmup']} steps to {r['schedule']['lr']:g}, cosine to
{r['schedule']['min_lr_ratio']:g} of it; {r['seconds_per_step']} s / step.

| | valid loss, 32 blocks | valid loss, all {s['articles']} articles ({s['tokens']:,} tokens, rolling) | token perplexity | word perplexity |
|---|---|---|---|---|
| shipped teacher | {r['start']['quick_valid']:.4f} | {s['loss']:.4f} | {s['ppl']:.2f} | {s['word_ppl']:.2f} |
| after {r['continued_steps']:,} more steps (bfloat16, as it would ship) | {r['end']['quick_valid']:.4f} | {e['loss']:.4f} | {e['ppl']:.2f} | {e['word_ppl']:.2f} |

Change in whole-valid loss: **{r['delta_valid_loss']:+.4f} nats / token**.

| step | learning rate | train loss | valid loss, 32 blocks |
|---|---|---|---|
{rows}
"""


if __name__ == "__main__":
    main()

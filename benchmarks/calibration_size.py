"""How much calibration text activation importance needs: the study's width student chosen from 32 to 512
calibration blocks, each aggregation, against weight magnitude (which reads no text).

``minitron study`` calibrated on 32 blocks of 64 tokens (2,048 tokens) until this measurement; on the
bundled teacher it then found weight magnitude better than every activation aggregation right after
pruning. This script asks whether that is the method or the sample: for each calibration size
and sampling seed it scores importance with each of the four aggregations, prunes the teacher to the study's
width student (the same shape, the same plan and prune code as the study) and measures held-out loss on the
study's own held-out blocks, right after pruning (no distillation: that is where the choice of units shows).

Run by hand (about 5 minutes on one thread of the 2-core CPU for the bundled teacher):

    python benchmarks/calibration_size.py            # writes benchmarks/results/calibration_size.{json,md}
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import torch

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script


def measure(args) -> dict:
    from rich.progress import Progress

    from minitron import study
    from minitron.data import token_blocks
    from minitron.importance import compute_scores

    path, tokenizer, shape = study._teacher(args.teacher)
    train_docs, heldout_docs, text = study._documents(None)
    s = study.Settings()
    # The study's own held-out blocks (its calibration and training blocks are not used here: one of each).
    blocks = study.study_blocks(tokenizer, train_docs, heldout_docs, replace(s, calib=1, train=1))
    model = study._load_teacher(path)
    lab = study.Lab(model, shape, blocks, s, Progress(disable=True))
    _, width, _ = study.shapes(shape)

    def pruned_loss(scores) -> float:
        student, _ = lab.prune(width, scores)
        return round(lab.loss(student), 4)

    rows = []
    for size in args.sizes:
        for seed in range(args.seeds):
            calib = token_blocks(tokenizer, train_docs, seq_len=s.seq_len, samples=size, seed=seed,
                                 what="calibration text")
            for batch_agg, seq_agg in study.AGGREGATIONS:
                start = time.perf_counter()
                scores = compute_scores(model, calib, batch_size=s.batch, batch_agg=batch_agg, seq_agg=seq_agg,
                                        layer_loss=False, show_progress=False)
                rows.append({"blocks": size, "seed": seed, "batch_agg": batch_agg, "seq_agg": seq_agg,
                             "loss": pruned_loss(scores), "seconds": round(time.perf_counter() - start, 1)})
                print(json.dumps(rows[-1]), flush=True)
    magnitude = pruned_loss(study.magnitude_scores(model, scores))
    return {
        "teacher": machine.shown(path), "text": text, "teacher_loss": round(lab.loss(model), 4),
        "width": {"hidden": width.hidden, "ffn": width.ffn, "params": width.counts()["total"]},
        "seq_len": s.seq_len, "heldout_blocks": s.heldout, "magnitude": magnitude, "rows": rows,
    }


def summary(record: dict) -> list[dict]:
    """Mean and spread over seeds of each (size, aggregation)."""
    out = []
    keys = sorted({(r["blocks"], r["batch_agg"], r["seq_agg"]) for r in record["rows"]},
                  key=lambda k: (k[0], ["l2", "mean"].index(k[1]), ["mean", "l2"].index(k[2])))
    for blocks, b, q in keys:
        losses = [r["loss"] for r in record["rows"] if (r["blocks"], r["batch_agg"], r["seq_agg"]) == (blocks, b, q)]
        out.append({"blocks": blocks, "aggregation": f"batch {b} × seq {q}", "mean": statistics.fmean(losses),
                    "std": statistics.stdev(losses) if len(losses) > 1 else 0.0, "n": len(losses)})
    return out


def markdown(record: dict) -> list[str]:
    w, m = record["width"], record["magnitude"]
    lines = [
        "# Calibration size: activation importance against weight magnitude",
        "",
        f"Machine: {record['machine']}; load average {record['load_before']} before, {record['load_after']} after. "
        f"{record['threads']} torch thread(s). Versions: torch {record['versions']['torch']}, minitron "
        f"{record['versions']['minitron']}.",
        "",
        f"Teacher `{record['teacher']}` (held-out loss {record['teacher_loss']:.3f}), pruned by width to the "
        f"study's student: hidden {w['hidden']}, MLP {w['ffn']} ({w['params']:,} parameters). Held-out loss: "
        f"next-token cross entropy (nats) on the study's {record['heldout_blocks']} held-out blocks of "
        f"{record['seq_len']} tokens, right after pruning. Calibration: blocks of {record['seq_len']} tokens "
        f"sampled from the training documents ({record['text']}), one sample per seed.",
        "",
        f"Weight magnitude (its ranking reads no text; the RMSNorms that remain are rescaled by calibration "
        f"energies, as in every row: those of the last sample): **{m:.3f}**.",
        "",
        "| calibration blocks (tokens) | aggregation | held-out loss, mean ± std over seeds | − magnitude |",
        "|---|---|---|---|",
    ]
    for row in summary(record):
        lines.append(f"| {row['blocks']} ({row['blocks'] * record['seq_len']:,}) | {row['aggregation']}"
                     f"{' (default)' if row['aggregation'] == 'batch l2 × seq mean' else ''} | "
                     f"{row['mean']:.3f} ± {row['std']:.3f} (n={row['n']}) | {row['mean'] - m:+.3f} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", default=None, help="local teacher folder (default: the bundled teacher)")
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")], default=[32, 128, 512],
                        help="calibration blocks, comma-separated (the study used 32; it now uses 512)")
    parser.add_argument("--seeds", type=int, default=3, help="calibration samples per size")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="calibration_size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_before = machine.load_average()
    record = measure(args)
    record.update(machine=machine.describe(), load_before=load_before, load_after=machine.load_average(),
                  threads=args.threads, versions=machine.versions("minitron"))
    machine.write(args.name, record, markdown)


if __name__ == "__main__":
    main()

"""Which units to keep: minitron's activation importance beside weight magnitude, one axis at a time, cut by cut.

The torch-pruning comparison (``prune_vs_torch_pruning.py``) finds minitron behind torch-pruning right after
pruning at torch-pruning's own shape on the bundled teacher, and ahead at every other point. That shape cuts
the embedding by 37.5 % and the MLP by 37 %. This script takes the two axes apart: for each teacher it keeps
fewer embedding channels (everything else whole), then fewer MLP neurons in every layer (everything else
whole), in steps of 1/16 down to half, choosing the units by

* activation importance as ``minitron importance`` computes it (Minitron §2.2; embedding channels from every
  RMSNorm's output, neurons from the down projection's input), batch L2 × sequence mean (the default) and
  sequence L2, on the verb's default 1,024 calibration blocks;
* weight magnitude: the L2 norm of every weight that reads or writes the unit (the criterion of
  torch-pruning's LLM recipe, ``GroupMagnitudeImportance(p=2)``; computed as ``minitron study`` does);
* random units (three seeds: their spread is the noise floor of a comparison at that cut),

and scores each pruned model, right after pruning, on the held-out WikiText-2 *valid* blocks that the
comparison uses. A unigram model of the calibration text (token frequencies, nothing else) is the line at
which a pruned model has kept nothing of its teacher's use of context.

Run by hand (about 7 minutes per teacher on one CPU core); the committed results::

    PEERS_THREADS=1 python benchmarks/peers/unit_ranking.py --teacher minitron/assets/teacher --teacher ../teacher-tied

(``../teacher-tied``: built with ``scripts/train_teacher.py`` as ``prune_vs_torch_pruning.py`` says.)
Results: ``benchmarks/results/unit_ranking.{json,md}``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
from pathlib import Path

import common
import machine  # benchmarks/machine.py, on sys.path once common is imported

SEQ_LEN = 256
CALIBRATION = 1024  # `minitron importance --samples` default
SEEDS = 3
RANKINGS = ("activation (default)", "activation, seq L2", "weight magnitude")
AXES = {"hidden": "embedding channels", "ffn": "MLP neurons (every layer)"}


def unigram_loss(calib, heldout, vocab: int) -> float:
    """Cross entropy (nats) on ``heldout`` of the calibration text's token frequencies (add-½ smoothing)."""
    import torch

    counts = torch.bincount(calib.flatten(), minlength=vocab).double() + 0.5
    log_p = (counts / counts.sum()).log()
    return float(-log_p[heldout[:, 1:].flatten()].mean())


def rank(teacher: Path, args) -> dict:
    from transformers import AutoTokenizer

    from minitron.data import token_blocks
    from minitron.families import Shape
    from minitron.importance import compute_scores
    from minitron.plan import make_plan
    from minitron.prune import prune_model
    from minitron.quickstart import training_text
    from minitron.study import magnitude_scores, random_scores

    model, why = common.load_stock(teacher)
    if model is None:
        sys.exit(f"{teacher}: {why}")
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model.eval()
    shape = Shape.from_config(model.config)
    calib = token_blocks(tokenizer, training_text(), seq_len=SEQ_LEN, samples=args.samples, seed=0)
    heldout = common.heldout_blocks(tokenizer, samples=args.heldout, seq_len=SEQ_LEN)
    activation = {
        agg: compute_scores(model, calib, batch_size=8, seq_agg=agg, show_progress=False) for agg in ("mean", "l2")
    }
    rankings = dict(zip(RANKINGS, (activation["mean"], activation["l2"], magnitude_scores(model, activation["mean"]))))
    rankings |= {f"random {seed}": random_scores(activation["mean"], seed) for seed in range(SEEDS)}

    # Cuts in steps of 1/16 down to half; an embedding stays a multiple of the head count (transformers' Llama
    # needs it). Everything but the axis stays whole, so only the choice of its units differs.
    steps = {"hidden": math.lcm(shape.heads, max(1, shape.hidden // 16)), "ffn": max(1, shape.ffn // 16)}
    axes = {}
    for axis, step in steps.items():
        whole, axes[axis] = getattr(shape, axis), []
        for kept in range(whole - step, whole // 2 - 1, -step):
            student = dataclasses.replace(shape, **{axis: kept})
            losses = {}
            for name, scores in rankings.items():
                pruned = prune_model(model, make_plan(shape, student, scores))
                losses[name] = round(common.lm_loss(pruned, heldout), 4)
            axes[axis].append({"kept": kept, "params": student.counts()["total"], "loss": losses})
            print(f"{teacher.name}: {axis} {kept}: {losses}", flush=True)
    return {
        "teacher": str(teacher),
        "shape": shape.to_dict(),
        "loss": round(common.lm_loss(model, heldout), 4),
        "unigram_loss": round(unigram_loss(calib, heldout, shape.vocab), 4),
        "axes": axes,
    }


# --- report ---------------------------------------------------------------------------------------------------


def _random(losses: dict) -> list[float]:
    return [v for k, v in losses.items() if k.startswith("random")]


def row_line(row: dict, whole: int) -> str:
    """One cut: the three rankings (the lowest in bold where it leads the next by more than the random spread),
    random's mean ± std, and the default's difference from weight magnitude."""
    losses = row["loss"]
    named = [losses[k] for k in RANKINGS]
    noise = statistics.stdev(_random(losses))
    best, second = sorted(named)[:2]
    cells = [f"**{v:.3f}**" if v == best and second - best > noise else f"{v:.3f}" for v in named]
    return (
        f"| {row['kept']} ({1 - row['kept'] / whole:.1%}) | " + " | ".join(cells)
        + f" | {statistics.fmean(_random(losses)):.3f} ± {noise:.3f} | {named[0] - named[2]:+.3f} |"
    )


def markdown(record: dict) -> list[str]:
    s = record["settings"]
    lines = [
        "# Which units to keep: activation importance beside weight magnitude",
        "",
        machine.machine_line(record, f"; {record['threads']} torch thread(s)"),
        "",
        "One axis is cut at a time, everything else kept whole; the units kept are chosen by each ranking. "
        f"Held-out loss right after pruning, nats per token on {s['heldout']} blocks × {s['seq_len']} tokens of "
        f"WikiText-2 *valid* articles. Activation importance on {s['samples']} calibration blocks × "
        f"{s['seq_len']} tokens of the shipped train articles. Random: mean ± std over {s['seeds']} seeds, the "
        "noise floor of a comparison at that cut. **Bold**: the lowest of the three rankings where it leads the "
        "next by more than that spread. Unigram: the loss of token frequencies alone.",
    ]
    for t in record["teachers"]:
        sh = t["shape"]
        lines += [
            "",
            f"{common.teacher_heading(t)}; held-out loss {t['loss']:.3f}, unigram {t['unigram_loss']:.3f}",
        ]
        for axis, rows in t["axes"].items():
            lines += [
                "",
                f"{AXES[axis]}:",
                "",
                "| kept (cut) | activation (default) | activation, seq L2 | weight magnitude | random "
                "| default − magnitude |",
                "|---|---|---|---|---|---|",
                *(row_line(row, sh[axis]) for row in rows),
            ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, action="append", help="Llama checkpoint (repeatable)")
    parser.add_argument("--samples", type=int, default=CALIBRATION, help="calibration blocks for importance")
    parser.add_argument("--heldout", type=int, default=32, help="held-out blocks that score every model")
    parser.add_argument("--name", default="unit_ranking", help="results file stem")
    args = parser.parse_args()
    threads = int(os.environ.get("PEERS_THREADS", "2"))

    import torch

    torch.set_num_threads(threads)
    teachers = args.teacher or [common.ROOT / "minitron" / "assets" / "teacher"]
    load_before = machine.load_average()
    results = [rank(t.resolve(), args) for t in teachers]
    record = {
        "machine": machine.describe("cpu"),
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "threads": threads,
        "versions": machine.versions("minitron"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": {"samples": args.samples, "heldout": args.heldout, "seq_len": SEQ_LEN, "seeds": SEEDS},
        "teachers": results,
    }
    machine.write(args.name, record, markdown)


if __name__ == "__main__":
    main()

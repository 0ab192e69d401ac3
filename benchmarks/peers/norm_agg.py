r"""Embedding channels ranked by ``--norm-agg sum`` (Minitron's) beside ``--norm-agg max-share``, cut by cut.

An embedding channel is read by every norm of the model (two per Llama layer and the final one), and
``minitron importance`` scores it at each. ``sum`` adds a channel's scores over the norms, so the norms whose
outputs are largest decide the ranking; ``max-share`` divides each norm's scores by that norm's total and
keeps the largest share, so a channel that one layer leans on is kept even where the others barely read it.
``prune_vs_torch_pruning.py`` measures both at torch-pruning's shape, with distillation. This script measures
them where a user would choose: only the embedding cut, in steps of 1/16 down to half (everything else whole),
and both axes at once at a ``--shape HIDDEN,FFN``, right after pruning with ``minitron prune``'s code (the
remaining RMSNorms rescaled), on the held-out WikiText-2 *valid* blocks of the other peer benchmarks. Each
difference comes with its standard error, paired over those blocks, and each calibration draw (the same
number of blocks drawn with seeds 0, 1, …) is scored anew, since which blocks are read moves these numbers
by more than the held-out standard error (``results/unit_ranking.md``).

Run by hand (about 10 minutes a draw for the bundled teacher and 6 for the tied one, on one CPU core);
the committed results::

    PEERS_THREADS=1 python benchmarks/peers/norm_agg.py --teacher minitron/assets/teacher --shape 200,484 \
        --teacher ../teacher-tied --shape 160,400

(``../teacher-tied``: built with ``scripts/train_teacher.py`` as ``prune_vs_torch_pruning.py`` says.)
Results: ``benchmarks/results/norm_agg.{json,md}``.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from pathlib import Path

import common
import machine  # benchmarks/machine.py, on sys.path once common is imported
from minitron.errors import UserError, run_script  # the repository root is on sys.path once common is imported
from unit_ranking import SEQ_LEN, run_teachers, teacher_parser

WAYS = ("sum", "max-share")


def measure(teacher: Path, joint: tuple[int, int] | None, args) -> dict:
    from transformers import AutoTokenizer

    from minitron.data import token_blocks
    from minitron.families import Shape
    from minitron.importance import compute_scores
    from minitron.plan import make_plan
    from minitron.prune import prune_model
    from minitron.quickstart import training_text

    model, why = common.load_stock(teacher)
    if model is None:
        raise UserError(f"stock AutoModelForCausalLM cannot load it ({why})", where=str(teacher))
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    shape = Shape.from_config(model.config)
    heldout = common.heldout_blocks(tokenizer, samples=args.heldout, seq_len=SEQ_LEN)
    # An embedding stays a multiple of the head count (transformers' Llama needs it).
    step = math.lcm(shape.heads, max(1, shape.hidden // 16))
    students = [(f"hidden {kept}", dataclasses.replace(shape, hidden=kept))
                for kept in range(shape.hidden - step, shape.hidden // 2 - 1, -step)]  # fmt: skip
    if joint:
        students.append((f"both {joint[0]} / {joint[1]}", dataclasses.replace(shape, hidden=joint[0], ffn=joint[1])))
    cuts = {name: {"hidden": s.hidden, "ffn": s.ffn, "params": s.counts()["total"], "draws": []} for name, s in students}
    for seed in range(args.draws):
        calib = token_blocks(tokenizer, training_text(), seq_len=SEQ_LEN, samples=args.samples, seed=seed)
        scores = {way: compute_scores(model, calib, batch_size=8, norm_agg=way, show_progress=False) for way in WAYS}
        for name, student in students:
            blocks = {way: common.block_losses(prune_model(model, make_plan(shape, student, scores[way])), heldout)
                      for way in WAYS}  # fmt: skip
            mean, se = common.paired_difference(blocks["max-share"], blocks["sum"])
            cuts[name]["draws"].append({**{way: round(statistics.fmean(b), 4) for way, b in blocks.items()},
                                        "max_share_minus_sum": [round(mean, 4), round(se, 4)]})  # fmt: skip
            print(f"{teacher.name}: draw {seed}, {name}: {cuts[name]['draws'][-1]}", flush=True)
    return {"teacher": str(teacher), "shape": shape.to_dict(), "loss": round(common.lm_loss(model, heldout), 4),
            "cuts": cuts}  # fmt: skip


# --- report ---------------------------------------------------------------------------------------------------


def markdown(record: dict) -> list[str]:
    s = record["settings"]
    lines = [
        "# Embedding channels: `--norm-agg sum` (Minitron's) beside `--norm-agg max-share`",
        "",
        machine.machine_line(record, f"; {record['threads']} torch thread(s)"),
        "",
        "Held-out loss right after pruning (nats per token on "
        f"{s['heldout']} blocks × {s['seq_len']} tokens of WikiText-2 *valid* articles), the embedding channels "
        "kept by each way of combining a channel's scores over the norms; everything else as `minitron "
        "importance` computes it by default (batch L2 × sequence mean), on "
        f"{s['samples']} calibration blocks of the shipped train articles, drawn with seeds 0–{s['draws'] - 1}, "
        "and cut by `minitron prune`'s code (the remaining RMSNorms rescaled). *hidden N*: only the embedding "
        "cut; *both*: embedding and MLP at torch-pruning's shape for that teacher. Per draw: max-share − sum ± "
        "the standard error of that difference, paired over the held-out blocks; **bold** where it is more "
        "than two standard errors from 0.",
    ]
    for t in record["teachers"]:
        sh = t["shape"]
        draws = s["draws"]
        lines += [
            "",
            f"{common.teacher_heading(t)}; held-out loss {t['loss']:.3f}",
            "",
            "| cut | parameters | sum (mean over draws) | max-share (mean over draws) | "
            + " | ".join(f"max-share − sum, draw {k}" for k in range(draws)) + " |",
            "|---|---|---|---|" + "---|" * draws,
        ]
        for name, cut in t["cuts"].items():
            share = f" ({1 - cut['hidden'] / sh['hidden']:.1%} of the embedding)" if name.startswith("hidden") else ""
            cells = [_difference(*d["max_share_minus_sum"]) for d in cut["draws"]]
            lines.append(
                f"| {name}{share} | {cut['params']:,} | {statistics.fmean(d['sum'] for d in cut['draws']):.3f} | "
                f"{statistics.fmean(d['max-share'] for d in cut['draws']):.3f} | " + " | ".join(cells) + " |"
            )
    return lines


def _difference(mean: float, se: float) -> str:
    text = common.plus_minus(mean, se)
    return f"**{text}**" if abs(mean) > 2 * se else text


def main() -> None:
    parser = teacher_parser(__doc__.split("\n\n")[0])
    parser.add_argument("--draws", type=int, default=2, help="calibration draws (seeds 0, 1, …)")
    parser.add_argument("--name", default="norm_agg", help="results file stem")
    args = parser.parse_args()
    common.at_least(args, samples=1, heldout=2, draws=1)
    settings = {"samples": args.samples, "heldout": args.heldout, "seq_len": SEQ_LEN, "draws": args.draws}
    run_teachers(args, measure, settings, markdown)


if __name__ == "__main__":
    run_script(main)

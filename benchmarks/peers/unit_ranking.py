r"""Which units to keep: minitron's activation importance beside weight magnitude, one axis at a time, cut by cut.

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
* for embedding channels, one channel at a time: each channel's own cost, the calibration loss it adds when
  it alone is removed (zeroed in every weight that reads or writes it), measured on 16 calibration blocks
  rather than estimated from activations or weights. It is what a score of single channels tries to know;
  where activations beat it, how channels act together decides the cut, which it cannot see;
* for embedding channels, the default's channels cut without rescaling the RMSNorms that remain (what
  ``minitron prune`` did before ``norm_energy``): the rescaling's own effect at each cut;

and cuts each ranking's units with ``minitron prune``'s code (which rescales the remaining RMSNorms by the
calibration energy of the kept channels), then scores each pruned model, right after pruning, on the held-out
WikiText-2 *valid* blocks that the comparison uses; a difference between two rankings comes with its
standard error, paired over those blocks (both pruned models read the same ones). Given ``--shape
HIDDEN,FFN`` for a teacher (the shape torch-pruning produced for it), it also cuts both axes at once to that
shape, with each pair of rankings:
activations for both (minitron's default, with and without the norms rescaled, and with sequence L2), magnitude for both
(torch-pruning's criterion), and magnitude or measured cost for the embedding channels with activations for
the neurons; and minitron's two activation rankings again from ``--draws`` calibration draws (the same number
of blocks drawn with seeds 0, 1, …; seed 0 is the draw every other row uses), which shows how far the loss
right after pruning moves with which blocks were read, a spread that the held-out standard error does not
contain. A unigram model of the calibration text (token frequencies, nothing else)
is the line at which a pruned model has kept nothing of its teacher's use of context.

Run by hand (about 40 minutes for the bundled teacher and 15 for the tied one, on one CPU core); the committed results::

    PEERS_THREADS=1 python benchmarks/peers/unit_ranking.py --teacher minitron/assets/teacher --shape 200,484 \
        --teacher ../teacher-tied --shape 160,400

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
from minitron.errors import UserError, run_script  # the repository root is on sys.path once common is imported

SEQ_LEN = 256
CALIBRATION = 1024  # `minitron importance --samples` default
SEEDS = 3
RANKINGS = ("activation (default)", "activation, seq L2", "weight magnitude")
ALONE = "one channel at a time"
PLAIN = "activation, norms not rescaled"
AXES = {"hidden": "embedding channels", "ffn": "MLP neurons (every layer)"}
NAMED = {"hidden": (*RANKINGS, ALONE, PLAIN), "ffn": RANKINGS}  # the rankings each axis's table compares
MIXED = "magnitude channels, activation neurons"
JOINT = {  # both axes cut at once: ranking -> (embedding channels, MLP neurons) ranked by
    "activation (default)": "activation / activation (minitron's default)",
    "activation, seq L2": "activation, seq L2 / activation, seq L2",
    "weight magnitude": "weight magnitude / weight magnitude (torch-pruning's criterion)",
    MIXED: "weight magnitude / activation",
    ALONE: "one channel at a time / activation",
    PLAIN: "activation / activation, norms not rescaled",
}
ALONE_BLOCKS = 16
DEFAULT = RANKINGS[0]
DRAWN = {RANKINGS[0]: "mean", RANKINGS[1]: "l2"}  # the rankings scored again per calibration draw: seq_agg
DRAWS = 4


def unigram_loss(calib, heldout, vocab: int) -> float:
    """Cross entropy (nats) on ``heldout`` of the calibration text's token frequencies (add-½ smoothing)."""
    import torch

    counts = torch.bincount(calib.flatten(), minlength=vocab).double() + 0.5
    log_p = (counts / counts.sum()).log()
    return float(-log_p[heldout[:, 1:].flatten()].mean())


def one_at_a_time(model, like, blocks):
    """Scores whose embedding channels are each channel's own cost: the loss on ``blocks`` with that channel
    alone zeroed in every weight that reads or writes it (the residual stream then carries nothing there),
    minus the whole model's. The other keys are copied from ``like``."""
    import torch

    from minitron.importance import Scores
    from minitron.inputs import all_tensors

    shape, state = like.shape, model.state_dict()  # the state's tensors share the parameters' storage
    slices = [
        (state[name], spec.axes.index("hidden"))
        for name, spec in all_tensors(shape, shape.memory_layer_tensors())
        if name in state and "hidden" in spec.axes
    ]
    whole = common.lm_loss(model, blocks)
    costs = torch.empty(shape.hidden)
    with torch.no_grad():
        for c in range(shape.hidden):
            saved = [w.select(dim, c).clone() for w, dim in slices]
            for w, dim in slices:
                w.select(dim, c).zero_()
            costs[c] = common.lm_loss(model, blocks) - whole
            for (w, dim), kept in zip(slices, saved):
                w.select(dim, c).copy_(kept)
    return Scores({**like.tensors, "hidden": costs}, {**like.meta, "method": ALONE})


def rank(teacher: Path, joint: tuple[int, int] | None, args) -> dict:
    from transformers import AutoTokenizer

    from minitron.data import token_blocks
    from minitron.families import Shape
    from minitron.importance import compute_scores
    from minitron.plan import make_plan
    from minitron.prune import prune_model
    from minitron.quickstart import training_text
    from minitron.study import magnitude_scores, random_scores

    model, why = common.load_stock(teacher)
    if model is None:  # weights check_inputs passed but transformers refuses
        raise UserError(f"stock AutoModelForCausalLM cannot load it ({why})", where=str(teacher))
    tokenizer = AutoTokenizer.from_pretrained(teacher)
    model.eval()
    shape = Shape.from_config(model.config)
    calib = token_blocks(tokenizer, training_text(), seq_len=SEQ_LEN, samples=args.samples, seed=0)
    heldout = common.heldout_blocks(tokenizer, samples=args.heldout, seq_len=SEQ_LEN)
    activation = {
        agg: compute_scores(model, calib, batch_size=8, seq_agg=agg, show_progress=False) for agg in ("mean", "l2")
    }
    rankings = dict(zip(RANKINGS, (activation["mean"], activation["l2"], magnitude_scores(model, activation["mean"]))))
    rankings[ALONE] = one_at_a_time(model, activation["mean"], calib[:ALONE_BLOCKS])
    rankings[MIXED] = dataclasses.replace(
        activation["mean"], tensors={**activation["mean"].tensors, "hidden": rankings["weight magnitude"]["hidden"]}
    )
    rankings |= {f"random {seed}": random_scores(activation["mean"], seed) for seed in range(SEEDS)}
    # The default's channels, cut as minitron did before it rescaled the norms that remain (no norm energies).
    plain = {k: v for k, v in activation["mean"].tensors.items() if k != "norm_energy"}
    rankings[PLAIN] = dataclasses.replace(activation["mean"], tensors=plain)

    def losses(student, names) -> tuple[dict, dict]:
        """Held-out loss of the teacher pruned to ``student`` by each named ranking, and each one's loss per
        held-out block (what the paired differences below are drawn from)."""
        blocks = {n: common.block_losses(prune_model(model, make_plan(shape, student, rankings[n])), heldout)
                  for n in names}  # fmt: skip
        return {n: round(statistics.fmean(b), 4) for n, b in blocks.items()}, blocks

    # Cuts in steps of 1/16 down to half; an embedding stays a multiple of the head count (transformers' Llama
    # needs it). Everything but the axis stays whole, so only the choice of its units differs.
    steps = {"hidden": math.lcm(shape.heads, max(1, shape.hidden // 16)), "ffn": max(1, shape.ffn // 16)}
    axes = {}
    for axis, step in steps.items():
        whole, axes[axis] = getattr(shape, axis), []
        for kept in range(whole - step, whole // 2 - 1, -step):
            student = dataclasses.replace(shape, **{axis: kept})
            mean, blocks = losses(student, [n for n in rankings if n in NAMED[axis] or n.startswith("random")])
            axes[axis].append({"kept": kept, "params": student.counts()["total"], "loss": mean,
                               "default_minus_magnitude": _paired(blocks[DEFAULT], blocks["weight magnitude"])})
            print(f"{teacher.name}: {axis} {kept}: {mean}", flush=True)
    both = None
    if joint:  # both axes at once, at the shape torch-pruning produced for this teacher
        student = dataclasses.replace(shape, hidden=joint[0], ffn=joint[1])
        mean, blocks = losses(student, [n for n in rankings if n in JOINT or n.startswith("random")])
        both = {"hidden": joint[0], "ffn": joint[1], "params": student.counts()["total"], "loss": mean,
                "minus_default": {n: _paired(blocks[n], blocks[DEFAULT]) for n in JOINT if n != DEFAULT},
                "draws": {n: [mean[n]] for n in DRAWN}}
        for seed in range(1, args.draws):  # the same count of calibration blocks, drawn again
            drawn = token_blocks(tokenizer, training_text(), seq_len=SEQ_LEN, samples=args.samples, seed=seed)
            for name, agg in DRAWN.items():
                scores = compute_scores(model, drawn, batch_size=8, seq_agg=agg, show_progress=False)
                pruned = prune_model(model, make_plan(shape, student, scores))
                both["draws"][name].append(round(common.lm_loss(pruned, heldout), 4))
        print(f"{teacher.name}: both {joint}: {both['loss']}", flush=True)
    return {
        "teacher": str(teacher),
        "shape": shape.to_dict(),
        "loss": round(common.lm_loss(model, heldout), 4),
        "unigram_loss": round(unigram_loss(calib, heldout, shape.vocab), 4),
        "axes": axes,
        "joint": both,
    }


# --- report ---------------------------------------------------------------------------------------------------


def _paired(a: list[float], b: list[float]) -> list[float]:
    """``a − b`` over the same held-out blocks, and its standard error: ``[mean, se]``."""
    return [round(x, 4) for x in common.paired_difference(a, b)]


def _random(losses: dict) -> list[float]:
    return [v for k, v in losses.items() if k.startswith("random")]


def row_line(row: dict, whole: int, names: tuple[str, ...]) -> str:
    """One cut: the named rankings (the lowest in bold where it leads the next by more than the random spread),
    random's mean ± std, and the default's difference from weight magnitude ± its paired standard error."""
    losses = row["loss"]
    named = [losses[k] for k in names]
    noise = statistics.stdev(_random(losses))
    best, second = sorted(named)[:2]
    cells = [f"**{v:.3f}**" if v == best and second - best > noise else f"{v:.3f}" for v in named]
    return (
        f"| {row['kept']} ({1 - row['kept'] / whole:.1%}) | " + " | ".join(cells)
        + f" | {statistics.fmean(_random(losses)):.3f} ± {noise:.3f} | {_difference(row, named)} |"
    )


def _difference(row: dict, named: list[float]) -> str:
    paired = row.get("default_minus_magnitude")  # absent in results written before it was measured
    return common.plus_minus(*paired) if paired else f"{named[0] - named[2]:+.3f}"


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
        "noise floor of a comparison at that cut. One channel at a time: each embedding channel ranked by the "
        f"loss it adds on {s['alone_blocks']} calibration blocks when it alone is removed. Every ranking's "
        "units are cut by minitron's pruner, which multiplies each RMSNorm that remains by the root of its "
        "input's mean square over the kept channels relative to all, measured on the calibration blocks "
        "(`minitron.plan.norm_scales`); *norms not rescaled*: the default's channels cut without that. "
        "**Bold**: the lowest of the rankings where it leads the next by more than the random spread. "
        "Differences between two rankings: ± the standard error of the difference, paired over the held-out "
        "blocks (both pruned models read the same ones). "
        "Unigram: the loss of token frequencies alone.",
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
                f"| kept (cut) | {' | '.join(NAMED[axis])} | random | default − magnitude |",
                "|---|" + "---|" * (len(NAMED[axis]) + 2),
                *(row_line(row, sh[axis], NAMED[axis]) for row in rows),
            ]
        if t.get("joint"):
            lines += ["", *joint_lines(t["joint"], sh)]
    return lines


def joint_lines(joint: dict, shape: dict) -> list[str]:
    """Both axes cut at once to torch-pruning's shape: one row per pair of rankings, random's below."""
    losses, noise = joint["loss"], _random(joint["loss"])
    return [
        f"both axes at torch-pruning's shape (hidden {joint['hidden']} of {shape['hidden']}, MLP {joint['ffn']} "
        f"of {shape['ffn']}, {joint['params']:,} parameters):",
        "",
        "| embedding channels / MLP neurons ranked by | loss right after pruning | − minitron's default |",
        "|---|---|---|",
        *(f"| {label} | {losses[name]:.3f} | {_versus_default(joint, name)} |" for name, label in JOINT.items()),
        f"| random / random | {statistics.fmean(noise):.3f} ± {statistics.stdev(noise):.3f} | |",
        *draw_lines(joint),
    ]


def draw_lines(joint: dict) -> list[str]:
    """minitron's activation rankings from each calibration draw at that shape, beside torch-pruning's criterion
    (whose ranking reads no calibration text); nothing for results written before draws were measured."""
    draws = joint.get("draws")
    if not draws or len(next(iter(draws.values()))) < 2:
        return []
    count, magnitude = len(next(iter(draws.values()))), joint["loss"]["weight magnitude"]
    return [
        "",
        (
            f"the activation rankings from {count} calibration draws (the same number of blocks, drawn with seeds "
            f"0–{count - 1}; draw 0 is the one above), against weight magnitude / weight magnitude ({magnitude:.3f}):"
        ),
        "",
        (
            f"| embedding channels / MLP neurons ranked by | {' | '.join(f'draw {k}' for k in range(count))} "
            "| mean ± std over draws | draws below magnitude |"
        ),
        "|---|" + "---|" * (count + 2),
        *(
            f"| {JOINT[name]} | {' | '.join(f'{v:.3f}' for v in losses)} | "
            f"{statistics.fmean(losses):.3f} ± {statistics.stdev(losses):.3f} | "
            f"{sum(v < magnitude for v in losses)} of {count} |"
            for name, losses in draws.items()
        ),
    ]


def _versus_default(joint: dict, name: str) -> str:
    paired = joint.get("minus_default", {}).get(name)
    return common.plus_minus(*paired) if paired else ""


def check_inputs(teachers: list[Path], texts: list[str]) -> list[tuple[int, int] | None]:
    """Every teacher's checkpoint (through minitron's checked reader) and its ``--shape HIDDEN,FFN`` (as
    ``minitron prune`` checks a student), before the first minute of work; the shapes, or ``None`` each."""
    from minitron.families import Shape
    from minitron.inputs import check_weights, read_config
    from minitron.plan import check_student

    how = f"pass HIDDEN,FFN, two whole numbers, once for every --teacher ({len(teachers)}) in the same order"
    shapes = []
    for text in texts:
        parts = text.split(",")
        if len(parts) != 2 or not all(part.strip().isdigit() for part in parts):
            raise UserError("not two whole numbers", where=f"--shape {text}", fix=how)
        shapes.append((int(parts[0]), int(parts[1])))
    if shapes and len(shapes) != len(teachers):
        raise UserError(f"{len(shapes)} given for {len(teachers)} teacher(s)", where="--shape", fix=how)
    wholes = [Shape.from_config(read_config(teacher)) for teacher in teachers]
    for teacher, shape, pair, text in zip(teachers, wholes, shapes, texts):
        try:
            check_student(shape, shape.replace(hidden=pair[0], ffn=pair[1]))
        except UserError as e:  # it names prune's flags; here the pair came from --shape
            raise UserError(e.what, where=f"--shape {text} for {teacher}", fix=e.fix) from None
    for teacher, shape in zip(teachers, wholes):
        check_weights(teacher, shape)
    return shapes or [None] * len(teachers)


def teacher_parser(description: str) -> argparse.ArgumentParser:
    """The arguments every per-teacher ranking script takes (this one and ``norm_agg.py``): the teachers, each
    one's torch-pruning shape, and the calibration and held-out block counts."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--teacher", type=Path, action="append", help="Llama checkpoint (repeatable)")
    parser.add_argument(
        "--shape", action="append", default=[], metavar="HIDDEN,FFN",
        help="torch-pruning's shape for the teacher of the same place, to cut both axes at once (repeatable)",
    )
    parser.add_argument("--samples", type=int, default=CALIBRATION, help="calibration blocks for importance")
    parser.add_argument("--heldout", type=int, default=32, help="held-out blocks that score every model")
    return parser


def run_teachers(args, measure, settings: dict, markdown) -> None:
    """Check every teacher and shape, ``measure(teacher, shape or None, args)`` each on ``PEERS_THREADS``
    torch threads (default 2), and write ``results/{args.name}.{json,md}`` with the machine, its load, the
    versions, the command and ``settings``."""
    threads = int(os.environ.get("PEERS_THREADS", "2"))

    import torch

    torch.set_num_threads(threads)
    teachers = args.teacher or [common.ROOT / "minitron" / "assets" / "teacher"]
    shapes = check_inputs(teachers, args.shape)
    load_before = machine.load_average()
    results = [measure(t.resolve(), joint, args) for t, joint in zip(teachers, shapes)]
    record = {
        "machine": machine.describe("cpu"),
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "threads": threads,
        "versions": machine.versions("minitron"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": settings,
        "teachers": results,
    }
    machine.write(args.name, record, markdown)


def main() -> None:
    parser = teacher_parser(__doc__.split("\n\n")[0])
    parser.add_argument(
        "--draws", type=int, default=DRAWS,
        help="calibration draws from which the activation rankings are scored again at the --shape (1: none)",
    )
    parser.add_argument("--name", default="unit_ranking", help="results file stem")
    args = parser.parse_args()
    common.at_least(args, samples=1, heldout=2, draws=1)
    settings = {
        "samples": args.samples, "heldout": args.heldout, "seq_len": SEQ_LEN, "seeds": SEEDS,
        "alone_blocks": min(ALONE_BLOCKS, args.samples), "draws": args.draws,
    }  # fmt: skip
    run_teachers(args, rank, settings, markdown)


if __name__ == "__main__":
    run_script(main)

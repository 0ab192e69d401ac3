"""Pruning quality beside torch-pruning: same teacher, same parameter count, same held-out text, same distillation.

For each teacher (the bundled one, and any other Llama checkpoint given with ``--teacher``):

1. ``minitron importance`` on the shipped WikiText-2 train articles, then ``minitron prune --target 0.5x
   --axes width`` (the search ranks width shapes at half the parameters by held-out loss; heads are kept,
   the search's default);
2. torch-pruning's LLM recipe (``examples/LLMs/prune_llm.py`` in its repository): ``MetaPruner`` with
   ``GroupMagnitudeImportance(p=2, group_reduction="mean")`` (the example's ``GroupNormImportance``,
   renamed), local (per-layer) ratios, ``lm_head`` ignored, ``round_to=4``, ``prune_head_dims=False``,
   in two settings:

   * ``heads``: the example as written: ``num_heads`` given for q/k/v, ``prune_num_heads=True`` and
     ``head_pruning_ratio`` equal to the width ratio;
   * ``keep heads``: q/k/v out-channels left alone (the axes ``minitron prune --axes width`` uses by
     default): embedding channels and MLP neurons only.

   The ratio is chosen so that the pruned model's parameter count lands as close as the recipe allows to
   what minitron's ``--target 0.5x`` wrote, among ratios whose hidden size transformers accepts (Llama in
   transformers 5 refuses a hidden size that is not a multiple of the head count);
3. ``minitron prune`` with the exact shape torch-pruning produced (``--hidden-size --ffn-size`` and, for
   ``heads``, ``--heads --kv-heads``), from the same scores: the equal-count comparison; with ``--seq-agg l2``
   also from scores aggregated by L2 over each sequence (``minitron importance --seq-agg l2``), and with
   ``--norm-agg max-share`` from scores whose embedding channels are ranked by their largest share of one
   norm's total (``minitron importance --norm-agg max-share``);
4. every output is loaded with stock ``AutoModelForCausalLM`` (float32, no remote code) and scored on
   WikiText-2 *valid* blocks (text no stage here reads), then distilled with ``minitron distill`` from its
   teacher with one recipe (same steps, data, batch, learning rate), once for each of ``--seeds`` data-order
   seeds, and scored again (mean ± std over the seeds).

Run by hand, never as a test (about 25 minutes per teacher on 2 CPU cores). The committed results, the second
teacher trained first (tied embeddings, 8 query / 4 KV heads):

    pip install -e '.[peers]'
    python scripts/train_teacher.py train --seed 0 --steps 600 --threads 2 --hidden 256 --layers 6 --heads 8 \
        --kv-heads 4 --ffn 640 --tie-embeddings --valid-articles 20 --test-articles 10 --out ../teacher-tied
    PEERS_THREADS=1 python benchmarks/peers/prune_vs_torch_pruning.py --teacher minitron/assets/teacher \
        --limit ffn=0.6 --seq-agg l2 --norm-agg max-share --name peers_prune_bundled
    PEERS_THREADS=1 python benchmarks/peers/prune_vs_torch_pruning.py --teacher ../teacher-tied \
        --limit ffn=0.6 --seq-agg l2 --norm-agg max-share --variants "keep heads" --name peers_prune_tied

(``--variants "keep heads"`` there: torch-pruning's head pruning had not finished on that teacher after 18
minutes; on the bundled one it fails at once.) Importance calibrates on ``minitron importance``'s
default 1,024 blocks (``--samples``); with the 64 these results used before, minitron's losses right after
pruning moved by up to 0.15 nats (``benchmarks/results/calibration_size.md`` measures that spread).
``--work DIR`` keeps the checkpoints, and a run stopped midway resumes from what DIR holds; without it the
run works in a temporary folder, removed when the run ends however it ends (``kill -9`` aside). The same
two commands with ``--work`` pointing at the folders those runs kept, ``--heldout 512`` and ``--name
peers_prune_{bundled,tied}_512`` score every model again on 512 held-out blocks (16× the text; a paired
difference's standard error about a quarter as large), reusing the pruned and distilled checkpoints.
``unit_ranking.py`` follows up on the one point where torch-pruning comes out ahead with minitron's default
importance, ``norm_agg.py`` on the other way of combining the embedding channels' scores that wins there.

Results: ``benchmarks/results/NAME.{json,md}`` (``--name``, default ``peers_prune``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import statistics
import sys
import time
from pathlib import Path

import common
import machine  # benchmarks/machine.py, on sys.path once common is imported
import yaml

# the repository root is on sys.path once common is imported
from minitron.errors import UserError, run_script

SEQ_LEN = 256


# --- torch-pruning ------------------------------------------------------------------------------------------


def tp_prune(teacher: Path, ratio: float, *, heads: bool, out: Path) -> dict:
    """torch-pruning's LLM recipe at ``ratio``; writes a Hugging Face checkpoint to ``out``.

    Returns the shape it produced, or ``{"error": ...}`` when torch-pruning fails on this model.
    """
    import torch
    import torch_pruning as tp
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    config = model.config
    num_heads, ignored = {}, [model.lm_head]
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            if heads:
                num_heads[module.q_proj] = config.num_attention_heads
                num_heads[module.k_proj] = config.num_key_value_heads
                num_heads[module.v_proj] = config.num_key_value_heads
            else:  # q/k/v keep their output channels; their input (hidden) channels still shrink
                ignored += [module.q_proj, module.k_proj, module.v_proj]
    example = {"input_ids": torch.randint(0, config.vocab_size, (1, 16)), "use_cache": False}
    try:
        pruner = tp.pruner.MetaPruner(
            model, example_inputs=example,
            importance=tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean"),
            global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored,
            num_heads=num_heads, prune_num_heads=heads, prune_head_dims=False,
            head_pruning_ratio=ratio if heads else 0.0, round_to=4,
            # transformers 5 returns a ModelOutput holding a cache object, which the tracer cannot walk.
            output_transform=lambda output: output.logits,
        )  # fmt: skip
        for group in pruner.step(interactive=True):
            group.prune()
    except Exception as e:  # noqa: BLE001 - a failure on this model is the result
        return {"error": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:200]}"}

    # What the example does after pruning: the config and the attention modules learn the new sizes.
    attn = model.model.layers[0].self_attn
    head_dim = attn.head_dim
    shape = {
        "hidden": model.lm_head.in_features,
        "ffn": model.model.layers[0].mlp.gate_proj.out_features,
        "heads": attn.q_proj.out_features // head_dim,
        "kv_heads": attn.k_proj.out_features // head_dim,
    }
    uniform = all(
        (l.mlp.gate_proj.out_features, l.self_attn.q_proj.out_features, l.self_attn.k_proj.out_features)
        == (shape["ffn"], shape["heads"] * head_dim, shape["kv_heads"] * head_dim)
        for l in model.model.layers
    )
    config.hidden_size, config.intermediate_size = shape["hidden"], shape["ffn"]
    config.num_attention_heads, config.num_key_value_heads = shape["heads"], shape["kv_heads"]
    for layer in model.model.layers:
        layer.self_attn.num_key_value_groups = shape["heads"] // shape["kv_heads"]
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (teacher / name).is_file():
            shutil.copy(teacher / name, out / name)
    return {**shape, "uniform": uniform, "params": common.count_params(model), "ratio": ratio}


def tp_ratio(teacher_shape, target: int, heads_per_hidden: int) -> float:
    """The ratio whose keep-heads result (hidden and MLP each cut to ``round_to=4``) is closest to ``target``
    parameters, among those leaving a hidden size that transformers accepts for the model's head count."""
    best = None
    for step in range(100, 900):
        ratio = step / 1000
        hidden, ffn = (_kept(teacher_shape.hidden, ratio), _kept(teacher_shape.ffn, ratio))
        if hidden % heads_per_hidden:
            continue
        count = dataclasses.replace(teacher_shape, hidden=hidden, ffn=ffn).counts()["total"]
        if best is None or abs(count - target) < best[0]:
            best = (abs(count - target), ratio)
    return best[1]


def _kept(channels: int, ratio: float, round_to: int = 4) -> int:
    # torch-pruning's local pruning: int(channels * ratio) removed, the rest rounded down to round_to.
    kept = channels - int(channels * ratio)
    return kept - kept % round_to


# --- one teacher ------------------------------------------------------------------------------------------------


def score(path: Path, blocks) -> dict:
    model, reason = common.load_stock(path)
    if model is None:
        return {"loads": False, "why": reason}
    losses = common.block_losses(model, blocks)
    return {"loads": True, "params": common.count_params(model), "loss": statistics.fmean(losses), "blocks": losses}


def distill(teacher: Path, student: Path, run: Path, text: Path, args, seed: int) -> Path:
    """``minitron distill`` with the one recipe every student gets; returns the final checkpoint. The seed
    orders the training blocks (which the recipe's seed decides, and nothing else here: the student is given)."""
    recipe = {
        "teacher": {"path": str(teacher)},
        "student": {"path": str(student)},
        "data": {"source": str(text), "seq_len": SEQ_LEN},
        "loss": {"kd": 1.0, "temperature": 1.0, "lm": 0.0},
        "optimizer": {"lr": args.lr, "min_lr": args.lr / 10, "warmup_steps": max(1, args.steps // 10),
                      "weight_decay": 0.0, "grad_clip": 1.0},
        "batch": {"micro": args.batch, "global": args.batch},
        "budget": {"steps": args.steps},
        "precision": "fp32",
        "eval": {"every": 0, "blocks": 4},
        "checkpoint": {"every": 0},
        "output": {"dir": str(run)},
        "seed": seed,
    }  # fmt: skip
    path = run.parent / f"{run.name}.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    if not (run / "final" / "config.json").is_file():  # kept from an earlier, interrupted run of this script
        common.minitron_cli("distill", str(path), log=run.parent / f"{run.name}.log")
    return run / "final"


def _unless_done(out: Path, *args: str, log: Path) -> float | None:
    """``minitron ARGS`` unless ``out`` holds what an earlier run of this script wrote there: the wall seconds
    it took, or ``None`` when it was reused (and so not timed)."""
    if (out / "config.json").is_file():
        return None
    return common.minitron_cli(*args, log=log)["wall_s"]


def _timings(work: Path, measured: dict[str, float | None]) -> dict[str, float | None]:
    """The wall seconds of each step, keyed by its output's name: this run's where it ran the step, else those
    that ``WORK/timings.json`` kept from the run that made the output (None where no run recorded them)."""
    path = work / "timings.json"
    known = json.loads(path.read_text()) if path.is_file() else {}
    known.update({k: v for k, v in measured.items() if v is not None})
    path.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n")
    return {k: known.get(k) for k in measured}


def _shape_of(out: Path, config: dict | None = None) -> dict:
    """The widths of the checkpoint in ``out``, from its config (``config``, when it has been read already)."""
    c = config or json.loads((out / "config.json").read_text())
    return {"hidden": c["hidden_size"], "ffn": c["intermediate_size"], "heads": c["num_attention_heads"],
            "kv_heads": c["num_key_value_heads"]}  # fmt: skip


def _tp_done(out: Path, ratio: float) -> dict | None:
    """What ``tp_prune`` returned for the output an earlier run of this script wrote, read back from its config
    and its tensors' shapes."""
    from safetensors import safe_open

    if not (out / "config.json").is_file():
        return None
    c = json.loads((out / "config.json").read_text())
    shape = _shape_of(out, c)
    head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
    want = {"mlp.gate_proj": shape["ffn"], "self_attn.q_proj": shape["heads"] * head_dim,
            "self_attn.k_proj": shape["kv_heads"] * head_dim}  # fmt: skip
    with safe_open(out / "model.safetensors", framework="pt") as f:
        sizes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    uniform = all(
        sizes[name][0] == want[part]
        for name in sizes
        for part in want
        if name.endswith(f"{part}.weight")
    )
    # distinct parameters, as `common.count_params` counts them: a tied head, stored as its own tensor, once
    tied = c.get("tie_word_embeddings", False)
    params = sum(math.prod(s) for name, s in sizes.items() if not (tied and name == "lm_head.weight"))
    return {**shape, "uniform": uniform, "params": params, "ratio": ratio}


def compare(teacher: Path, work: Path, text: Path, args) -> dict:
    from transformers import AutoTokenizer

    from minitron.families import Shape
    from minitron.inputs import load_config

    # Outputs already in WORK (from an interrupted run with the same settings) are reused, not redone.
    work.mkdir(parents=True, exist_ok=True)
    shape = Shape.from_config(load_config(teacher))
    blocks = common.heldout_blocks(AutoTokenizer.from_pretrained(teacher), samples=args.heldout, seq_len=SEQ_LEN)
    scores = work / "scores.safetensors"
    log = work / "minitron.log"
    data = ["--calib", str(text), "--samples", str(args.samples), "--seq-len", str(SEQ_LEN), "--batch-size", "8"]
    importance_s = None
    if not scores.is_file():
        importance_s = common.minitron_cli("importance", str(teacher), *data, "-o", str(scores), log=log)["wall_s"]

    rows: dict[str, dict] = {}
    out = work / "minitron-0.5x"
    seconds = _unless_done(
        out, "prune", str(teacher), "--target", "0.5x", "--axes", "width", "--scores", str(scores), *data,
        "--heldout-samples", "16", "-o", str(out), log=log,
    )  # fmt: skip
    chosen = _shape_of(out)
    rows["minitron --target 0.5x --axes width"] = {"tool": "minitron", "path": out, "prune_s": seconds,
                                                   "shape": chosen}  # fmt: skip
    target = dataclasses.replace(shape, hidden=chosen["hidden"], ffn=chosen["ffn"]).counts()["total"]
    ratio = tp_ratio(shape, target, shape.heads)
    for limit in args.limit or ():
        # The same search with another --limit (the quickstart's ffn=0.6 lets it weigh a shallower MLP cut).
        out = work / f"minitron-0.5x-limit-{limit.replace('=', '-')}"
        seconds = _unless_done(
            out, "prune", str(teacher), "--target", "0.5x", "--axes", "width", "--limit", limit, "--scores",
            str(scores), *data, "--heldout-samples", "16", "-o", str(out), log=log,
        )  # fmt: skip
        rows[f"minitron --target 0.5x --axes width --limit {limit}"] = {
            "tool": "minitron", "path": out, "prune_s": seconds,
        }

    for variant, heads in (("keep heads", False), ("heads", True)):
        if variant not in args.variants.split(","):
            continue
        out = work / f"torch-pruning-{variant.replace(' ', '-')}"
        started, seconds = time.perf_counter(), None
        produced = _tp_done(out, ratio)
        if produced is None:
            produced, seconds = tp_prune(teacher, ratio, heads=heads, out=out), time.perf_counter() - started
        name = f"torch-pruning ({variant}), ratio {ratio}"
        rows[name] = {"tool": "torch-pruning", "path": out, "prune_s": seconds, **produced}
        if "error" in produced:
            continue
        twin = work / f"minitron-shape-of-torch-pruning-{variant.replace(' ', '-')}"
        flags = ["--hidden-size", str(produced["hidden"]), "--ffn-size", str(produced["ffn"])]
        if heads:
            flags += ["--heads", str(produced["heads"]), "--kv-heads", str(produced["kv_heads"])]
        try:
            seconds = _unless_done(twin, "prune", str(teacher), *flags, "--scores", str(scores), "-o", str(twin),
                                   log=log)  # fmt: skip
            rows[f"minitron, torch-pruning's {variant} shape"] = {
                "tool": "minitron", "path": twin, "prune_s": seconds, "flags": " ".join(flags),
            }
        except RuntimeError as e:
            rows[f"minitron, torch-pruning's {variant} shape"] = {"tool": "minitron", "error": str(e)[-300:]}
        for flag, agg, stem in other_importance(args):
            # The same shape from scores aggregated otherwise: over each sequence (minitron's default is the
            # paper's mean; L2 is the other choice its README names) or over the norms (sum, or max-share).
            other = work / f"scores-{stem}.safetensors"
            if not other.is_file():
                common.minitron_cli("importance", str(teacher), *data, flag, agg, "-o", str(other), log=log)
            twin = work / f"minitron-{stem}-shape-of-torch-pruning-{variant.replace(' ', '-')}"
            seconds = _unless_done(twin, "prune", str(teacher), *flags, "--scores", str(other), "-o", str(twin),
                                   log=log)  # fmt: skip
            rows[f"minitron importance {flag} {agg}, torch-pruning's {variant} shape"] = {
                "tool": "minitron", "path": twin, "prune_s": seconds, "flags": " ".join(flags),
            }

    timings = _timings(work, {scores.name: importance_s,
                              **{Path(r["path"]).name: r["prune_s"] for r in rows.values() if "path" in r}})
    importance_s = timings[scores.name]
    for name, row in rows.items():
        if "path" in row:
            row["prune_s"] = timings[Path(row["path"]).name]
        path = row.pop("path", None)
        if "error" in row:
            continue
        row["path"] = str(path)
        row.setdefault("shape", _shape_of(path))  # the record must not need WORK, which may be temporary
        print(f"{teacher.name}: scoring {name}", flush=True)
        row["pruned"] = score(path, blocks)
        if row["pruned"]["loads"]:
            # Seed 0 keeps the folder name of the runs before seeds were repeated, so --work reuses them.
            runs = [work / (f"distill-{path.name}" + (f"-seed{seed}" if seed else "")) for seed in range(args.seeds)]
            losses = [score(distill(teacher, path, run, text, args, seed), blocks)["loss"]
                      for seed, run in enumerate(runs)]  # fmt: skip
            row["distilled"] = {"losses": losses, "loss": statistics.fmean(losses),
                                "std": statistics.stdev(losses) if len(losses) > 1 else 0.0}  # fmt: skip
    teacher_model, _ = common.load_stock(teacher)
    return {
        "teacher": str(teacher),
        "shape": shape.to_dict(),
        "params": common.count_params(teacher_model),
        "loss": common.lm_loss(teacher_model, blocks),
        "target_params": target,
        "importance_s": importance_s,
        "rows": rows,
    }


# --- report -------------------------------------------------------------------------------------------------


def versus(row: dict, peer: dict | None) -> str:
    """``row``'s loss minus torch-pruning's, with standard errors: right after pruning paired over the held-out
    blocks (both models read the same ones), after distillation paired over the data-order seeds (seed k of
    both students sees the same batches)."""
    if peer is None or row is peer or row.get("tool") != "minitron":
        return ""
    parts = []
    if "blocks" in row.get("pruned", {}) and "blocks" in peer["pruned"]:
        parts.append(common.plus_minus(*common.paired_difference(row["pruned"]["blocks"], peer["pruned"]["blocks"])))
    ours, theirs = row.get("distilled", {}).get("losses"), peer.get("distilled", {}).get("losses")
    if ours and theirs and len(ours) == len(theirs):
        parts.append(common.plus_minus(*common.paired_difference(ours, theirs)))
    return " / ".join(parts) if len(parts) == 2 else ""


def markdown(record: dict) -> list[str]:
    s = record["settings"]
    lines = [
        "# Pruning quality: minitron beside torch-pruning",
        "",
        machine.machine_line(record),
        "",
        f"Held-out loss: mean next-token cross-entropy (nats) on {s['heldout']} blocks × {SEQ_LEN} tokens of "
        "WikiText-2 *valid* articles, each model loaded with stock `AutoModelForCausalLM` (float32). "
        f"Importance: {s['samples']} calibration blocks of the shipped WikiText-2 train articles; minitron's "
        "pruner rescales each RMSNorm that remains by its calibration energy in the kept channels "
        "(`minitron.plan.norm_scales`). Distillation: "
        f"`minitron distill`, the same recipe for every student: forward KL at τ = 1 from its teacher, {s['steps']} "
        f"steps × {s['batch']} × {SEQ_LEN} tokens of the same train articles, AdamW lr {s['lr']} (cosine to a tenth, "
        f"10 % warm-up), fp32; after distillation: mean ± std over {s.get('seeds', 1)} data-order seeds (0, 1, …) "
        "of that recipe. The last column: minitron's loss minus torch-pruning's (its keep-heads row) ± the standard "
        "error of that difference, paired over the held-out blocks right after pruning and over the seeds after "
        "distillation. torch-pruning: its LLM example's recipe (see the script's docstring), at the "
        "ratio that lands nearest minitron's parameter count with a hidden size transformers accepts. "
        "The losses do not depend on the machine's load; the timings in the JSON do. They are those of the run "
        "that made each output (a rerun over the same `--work` reuses the outputs there and the timings kept "
        "beside them), null where none was recorded.",
    ]
    for t in record["teachers"]:
        lines += [
            "",
            f"{common.teacher_heading(t)}; {t['params']:,} parameters, held-out loss {t['loss']:.3f}",
            "",
            "| method | shape (hidden / MLP / heads / KV) | parameters | Δ vs minitron 0.5x "
            "| loads with stock AutoModelForCausalLM | loss after pruning | loss after distillation "
            "| Δ loss vs torch-pruning: after pruning / after distillation |",
            "|---|---|---|---|---|---|---|---|",
        ]
        reference = t["rows"]["minitron --target 0.5x --axes width"].get("pruned", {}).get("params")
        peer = next((r for r in t["rows"].values() if r.get("tool") == "torch-pruning" and "pruned" in r), None)
        for name, row in t["rows"].items():
            if "error" in row:
                lines.append(f"| {name} | fails: `{row['error'].splitlines()[-1]}` | | | | | |")
                continue
            pruned, distilled = row.get("pruned", {}), row.get("distilled", {})
            params = pruned.get("params")
            shape = row.get("shape") or {k: row.get(k) for k in ("hidden", "ffn", "heads", "kv_heads")}
            delta = f"{params - reference:+,}" if params and reference else ""
            loads = "yes" if pruned.get("loads") else f"no: {pruned.get('why', '')}"
            after = f"{distilled['loss']:.3f} ± {distilled.get('std', 0.0):.3f}" if distilled else ""
            lines.append(
                f"| {name} | {shape['hidden']} / {shape['ffn']} / {shape['heads']} / {shape['kv_heads']} "
                f"| {params:,} | {delta} | {loads} | {pruned.get('loss', float('nan')):.3f} | {after} "
                f"| {versus(row, peer)} |"
                if params else f"| {name} | | | | {loads} | | | |"
            )
    return lines


def other_importance(args) -> list[tuple[str, str, str]]:
    """``(flag, value, file stem)`` of each other importance the equal-count shape is also pruned from."""
    return [("--seq-agg", agg, f"seq-{agg}") for agg in args.seq_agg or ()] + [
        ("--norm-agg", agg, f"norm-{agg}") for agg in args.norm_agg or ()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--teacher", type=Path, action="append", help="Llama checkpoint (repeatable)")
    parser.add_argument("--samples", type=int, default=1024, help="calibration blocks for importance")
    parser.add_argument("--heldout", type=int, default=32, help="held-out blocks that score every model")
    parser.add_argument("--steps", type=int, default=40, help="distillation steps")
    parser.add_argument("--batch", type=int, default=4, help="blocks per distillation step")
    parser.add_argument("--lr", type=float, default=2e-3, help="distillation peak learning rate")
    parser.add_argument("--seeds", type=int, default=3, help="distillations of each student (data-order seeds)")
    parser.add_argument("--limit", action="append", help="also run minitron's search with this --limit (repeatable)")
    parser.add_argument("--variants", default="keep heads,heads", help="torch-pruning settings to run")
    parser.add_argument("--seq-agg", action="append", choices=["l2", "var"],
                        help="also prune torch-pruning's shape from importance with this sequence aggregation")
    parser.add_argument("--norm-agg", action="append", choices=["max-share"],
                        help="also prune torch-pruning's shape from importance with this aggregation over the norms")
    parser.add_argument("--work", type=Path, default=None,
                        help="keep the checkpoints here (default: a temporary folder, removed at the end)")
    parser.add_argument("--name", default="peers_prune", help="results file stem")
    args = parser.parse_args()
    teachers = [t.resolve() for t in args.teacher or [common.ROOT / "minitron" / "assets" / "teacher"]]
    check_inputs(teachers, args)

    from minitron.quickstart import training_text

    text = training_text()
    load_before = machine.load_average()
    with common.scratch(args.work, "peers-prune-") as work:
        results = [compare(t, work / f"{i}-{t.name}", text, args) for i, t in enumerate(teachers)]
    record = {
        "machine": machine.describe("cpu"),
        "load_average_before": load_before,
        "load_average_after": machine.load_average(),
        "versions": machine.versions("torch-pruning", "minitron"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "settings": json.loads(json.dumps(vars(args), default=str)),
        "teachers": results,
    }
    machine.write(args.name, record, markdown)


def check_inputs(teachers: list[Path], args) -> None:
    """Everything a run needs, before its first minute of work: torch-pruning installed, sane numbers, every
    ``--limit`` and variant readable, and every teacher a Llama checkpoint that minitron's checked reader
    accepts (the recipe names Llama's modules)."""
    from minitron.families import Shape
    from minitron.inputs import check_weights, read_config
    from minitron.search_grid import parse_limits

    common.need("torch_pruning", "torch-pruning")
    common.at_least(args, samples=1, heldout=2, steps=1, batch=1, seeds=1)
    common.positive(args, lr=0.002)
    parse_limits(args.limit or ())
    unknown = set(args.variants.split(",")) - {"keep heads", "heads"}
    if unknown:
        raise UserError(f"unknown torch-pruning setting(s) {sorted(unknown)}", where="--variants",
                        fix='pass "keep heads", "heads" or both, comma-separated')  # fmt: skip
    for teacher in teachers:
        shape = Shape.from_config(read_config(teacher))
        if shape.model_type != "llama":
            raise UserError(f"a {shape.model_type} checkpoint: torch-pruning's LLM recipe here is Llama's",
                            where=str(teacher), fix="pass a Llama checkpoint")  # fmt: skip
        check_weights(teacher, shape)


if __name__ == "__main__":
    run_script(main)

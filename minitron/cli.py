"""The ``minitron`` command line: one short typed function per verb.

Each verb parses its flags, calls one function of the package and prints the result; the work lives in
the stage modules. Imports of heavy stage modules happen inside the verbs so that ``minitron --help``
and user errors stay fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

try:  # typer ≥ 0.20 carries its own copy of click
    from typer._click import exceptions as click
except ImportError:
    from click import exceptions as click

from minitron.errors import EXIT_USER_ERROR, Interrupted, UserError, full_disk_error, interrupt_on_signals

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a 64-bit integer

app = typer.Typer(
    name="minitron",
    help="Prune and distill small language models from big ones (NVIDIA Minitron method).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console()
err_console = Console(stderr=True)

ModelArg = Annotated[str, typer.Argument(help="Checkpoint folder, folder with only config.json, or hub id.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables.")]


@app.callback()
def _root() -> None:
    """Prune and distill small language models from big ones (NVIDIA Minitron method)."""


def print_json(obj) -> None:
    # Plain print, not rich: machine-readable output must not be wrapped or coloured.
    print(json.dumps(obj, indent=2, default=str))


@app.command()
def inspect(model: ModelArg, as_json: JsonOpt = False, trust_remote_code: bool = False) -> None:
    """Show a model's family, shape and parameter counts (no weights needed)."""
    from minitron.families import Shape
    from minitron.inputs import load_config
    from minitron.report_console import shape_table

    shape = Shape.from_config(load_config(model, trust_remote_code=trust_remote_code))
    info = {"model": str(model), "family": shape.model_type, "shape": shape.to_dict(), "params": shape.counts()}
    if as_json:
        print_json(info)
    else:
        console.print(shape_table(info))


@app.command()
def importance(
    model: ModelArg,
    calib: Annotated[str, typer.Option(help="Calibration text: .txt/.jsonl/.parquet file or folder, or hub dataset.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Scores file to write (.safetensors).")],
    samples: Annotated[int, typer.Option(help="Calibration blocks.")] = 1024,
    seq_len: Annotated[int, typer.Option(help="Tokens per block.")] = 4096,
    batch_size: Annotated[int, typer.Option(help="Blocks per forward pass.")] = 1,
    seed: Annotated[int, typer.Option(help="Seed of the block choice.", min=0, max=SEED_MAX)] = 0,
    batch_agg: Annotated[str, typer.Option(help="Aggregation over samples: mean, l2 or var.")] = "l2",
    seq_agg: Annotated[str, typer.Option(help="Aggregation over each sequence: mean, l2 or var.")] = "mean",
    norm_agg: Annotated[str, typer.Option(help="Embedding channels over the norms: sum or max-share.")] = "sum",
    layer_loss: Annotated[bool, typer.Option(help="Also score layers by the LM-loss rise when skipped.")] = False,
    offload: Annotated[bool, typer.Option(help="One layer at a time on the device (automatic if it won't fit).")] = False,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16 or float16.")] = "auto",
    split: Annotated[str, typer.Option(help="Split of a hub dataset.")] = "train",
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    trust_remote_code: bool = False,
) -> None:
    """Score heads, neurons, channels, experts and layers on calibration text (Minitron §2.2)."""
    from minitron import importance as imp

    scores, info = imp.run(
        model, calib, out, samples=samples, seq_len=seq_len, batch_size=batch_size, seed=seed,
        batch_agg=batch_agg, seq_agg=seq_agg, norm_agg=norm_agg, layer_loss=layer_loss, offload=offload, device=device,
        dtype=dtype, split=split, overwrite=overwrite, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    console.print(imp.summary_table(scores, info))


@app.command()
def prune(
    model: ModelArg,
    out: Annotated[Optional[Path], typer.Option("-o", "--out", help="Output checkpoint folder.")] = None,
    hidden_size: Annotated[Optional[int], typer.Option(help="Embedding channels to keep.")] = None,
    ffn_size: Annotated[Optional[int], typer.Option(help="MLP neurons per layer to keep (dense).")] = None,
    heads: Annotated[Optional[int], typer.Option(help="Query heads per layer (within GQA groups).")] = None,
    kv_heads: Annotated[Optional[int], typer.Option(help="KV groups per layer (whole groups removed).")] = None,
    layers: Annotated[Optional[int], typer.Option(help="Layers to keep (the lowest-scored go).")] = None,
    drop_layers: Annotated[Optional[str], typer.Option(help="Layers to drop, e.g. 16-31 or 3,5,10-12.")] = None,
    experts: Annotated[Optional[int], typer.Option(help="MoE: experts per layer to keep.")] = None,
    expert_ffn_size: Annotated[Optional[int], typer.Option(help="MoE: neurons per expert to keep.")] = None,
    top_k: Annotated[Optional[int], typer.Option(help="MoE: experts per token (default: the teacher's).")] = None,
    scores: Annotated[Optional[Path], typer.Option(help="Scores from `minitron importance`.")] = None,
    calib: Annotated[Optional[str], typer.Option(help="Calibration data: compute scores on the fly.")] = None,
    samples: Annotated[int, typer.Option(help="--calib: calibration blocks.")] = 1024,
    seq_len: Annotated[int, typer.Option(help="--calib: tokens per block.")] = 2048,
    batch_size: Annotated[int, typer.Option(help="--calib: blocks per forward pass.")] = 1,
    seed: Annotated[int, typer.Option(help="--calib: seed of the block choice.", min=0, max=SEED_MAX)] = 0,
    target: Annotated[Optional[str], typer.Option(help="Search the shape for a parameter count (4B, 800M) or fraction (0.5x).")] = None,
    active_target: Annotated[Optional[str], typer.Option(help="MoE: search for active parameters per token.")] = None,
    axes: Annotated[str, typer.Option(help="--target: what may shrink, any of width,depth,experts.")] = "width",
    prune_heads: Annotated[bool, typer.Option(help="--target: width may also remove query heads (within GQA groups).")] = False,
    tolerance: Annotated[Optional[str], typer.Option(help="--target: how far from it a candidate may land (2% or 0.02; default: the target's precision, 8B → ±6.25%, 4.5B or 0.5x → ±2%, at most 10%).")] = None,
    limit: Annotated[Optional[list[str]], typer.Option(help="--target: most of a dim to remove, e.g. ffn=0.4 (default 0.5; repeatable).")] = None,
    top_k_candidates: Annotated[int, typer.Option(help="--target: candidates pruned and scored on held-out tokens.")] = 5,
    rank_by: Annotated[str, typer.Option(help="--target: score candidates by held-out loss or kl to the teacher.")] = "loss",
    depth_strategy: Annotated[str, typer.Option(help="--target: layers to drop by window, block or loss.")] = "window",
    search_steps: Annotated[int, typer.Option(help="--target: distillation steps per candidate before scoring.")] = 0,
    heldout_samples: Annotated[int, typer.Option(help="--target: held-out blocks that score the candidates.")] = 32,
    dry_run: Annotated[bool, typer.Option(help="Show the student's shape and counts; write nothing.")] = False,
    as_json: JsonOpt = False,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    trust_remote_code: bool = False,
) -> None:
    """Prune MODEL to an explicit shape, or search one for --target: a stock Hugging Face checkpoint in OUT."""
    import shlex

    from minitron import prune as pruning
    from minitron.families import Shape
    from minitron.inputs import check_seq_len, load_config
    from minitron.plan import parse_layers, student_shape, summary_table

    explicit = {
        "--hidden-size": hidden_size, "--ffn-size": ffn_size, "--heads": heads, "--kv-heads": kv_heads,
        "--layers": layers, "--experts": experts, "--expert-ffn-size": expert_ffn_size, "--top-k": top_k,
    }  # fmt: skip
    searching = target is not None or active_target is not None
    config = load_config(model, trust_remote_code=trust_remote_code)
    teacher = Shape.from_config(config)
    if not searching and drop_layers is None and all(v is None for v in explicit.values()):
        # Without this a prune "to nothing" would write a full copy of the teacher.
        raise UserError("no student shape given", fix=f"pass --target SIZE, or any of {', '.join(explicit)}, --drop-layers")
    if calib is not None:
        check_seq_len(config, seq_len, "--seq-len")
    dropped = parse_layers(drop_layers, teacher.layers) if drop_layers else None
    if searching:
        from minitron import search
        from minitron.report_console import search_tables

        search.refuse_explicit(explicit)
        info = search.prune_to_target(
            model, teacher, target=target, active_target=active_target, axes=axes, prune_heads=prune_heads,
            tolerance=tolerance, limits=limit or (), dry_run=dry_run, out=out, drop_layers=dropped,
            ranking=search.Ranking(top_k_candidates, rank_by, depth_strategy, search_steps, heldout_samples),
            scores_file=scores, calibration=pruning.Calibration(calib, samples, seq_len, batch_size, seed) if calib else None,
            overwrite=overwrite, trust_remote_code=trust_remote_code, command=shlex.join(["minitron", *sys.argv[1:]]),
            show_progress=not as_json,
        )  # fmt: skip
        if as_json:
            return print_json(info)
        for renderable in search_tables(info, teacher):
            console.print(renderable)
        if "out" in info:
            console.print(f"wrote [bold]{info['out']}[/] (plan.json, search.json beside the weights)")
        return
    student = student_shape(
        teacher, hidden=hidden_size, ffn=ffn_size, heads=heads, kv_heads=kv_heads, layers=layers,
        experts=experts, expert_ffn=expert_ffn_size, top_k=top_k, drop_layers=dropped,
    )  # fmt: skip
    calibration = pruning.Calibration(calib, samples, seq_len, batch_size, seed) if calib else None
    info = pruning.run(
        model, teacher, student, out=out, drop_layers=dropped, scores_file=scores, calibration=calibration,
        dry_run=dry_run, overwrite=overwrite, trust_remote_code=trust_remote_code, show_progress=not as_json,
        command=shlex.join(["minitron", *sys.argv[1:]]),
    )  # fmt: skip
    if as_json:
        print_json(info)
    else:
        console.print(summary_table(info))
        if "out" in info:
            console.print(f"wrote [bold]{info['out']}[/]")


@app.command("eval")
def eval_(
    model: ModelArg,
    out: Annotated[Path, typer.Option("-o", "--out", help="Results JSON to write.")],
    tasks: Annotated[str, typer.Option(help="Comma-separated: mmlu, hellaswag, gsm8k, wikitext.")] = "mmlu,hellaswag,gsm8k,wikitext",
    limit: Annotated[Optional[int], typer.Option(help="Documents per task (quick checks only: not comparable).")] = None,
    batch_size: Annotated[str, typer.Option(help="Requests per forward pass, or auto.")] = "auto",
    data_dir: Annotated[Optional[Path], typer.Option(help="Local copies of the data sets instead of the hub.")] = None,
    hellaswag_shots: Annotated[int, typer.Option(help="0, or 10 as in the Minitron / Open LLM Leaderboard tables.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16.")] = "auto",
    tokenizer: Annotated[Optional[str], typer.Option(help="Tokenizer, if not saved beside the checkpoint.")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verbose: Annotated[bool, typer.Option(help="Keep lm-eval's and datasets' own log output.")] = False,
    name: Annotated[Optional[str], typer.Option(help="Row label in `minitron report` (default: the folder's name).")] = None,
    trust_remote_code: bool = False,
) -> None:
    """Evaluate MODEL with lm-eval (MMLU 5-shot, HellaSwag, GSM8K 5-shot, WikiText) into one results JSON."""
    from minitron.evaluate import evaluate, summary_table

    results = evaluate(
        model, out, tasks=tasks, limit=limit, batch_size=batch_size, data_dir=data_dir,
        hellaswag_shots=hellaswag_shots, device=device, dtype=dtype, tokenizer=tokenizer,
        trust_remote_code=trust_remote_code, overwrite=overwrite, verbose=verbose, name=name,
    )  # fmt: skip
    console.print(summary_table(results["minitron"]))
    console.print(f"wrote [bold]{out}[/]")


@app.command()
def report(
    results: Annotated[list[Path], typer.Argument(help="Results JSON files written by `minitron eval`.")],
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder (leaderboard.md, leaderboard.html).")],
    references: Annotated[bool, typer.Option(help="Show the published reference rows beside ours.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """Leaderboard of students beside their teachers (and published rows): Markdown + self-contained HTML."""
    from minitron.report import write_report

    written = write_report(results, out, references=references, overwrite=overwrite)
    console.print(f"wrote [bold]{written / 'leaderboard.md'}[/] and [bold]{written / 'leaderboard.html'}[/]")


@app.command()
def distill(
    recipe: Annotated[Path, typer.Argument(help="Recipe YAML, e.g. recipes/tiny-cpu.yaml.")],
    overrides: Annotated[
        Optional[list[str]], typer.Argument(help="key=value overrides with dotted keys, e.g. optimizer.lr=3e-5.")
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the run from its last checkpoint.")] = False,
    dry_run: Annotated[bool, typer.Option(help="Validate, check local paths and the run folder, print the resolved recipe.")] = False,
    trust_remote_code: bool = False,
) -> None:
    """Distill a student from its teacher as RECIPE says (many processes: torchrun or accelerate launch)."""
    import os
    import shlex

    from minitron.recipe import check_paths, load_recipe

    resolved = load_recipe(recipe, overrides or [])
    if dry_run:
        from minitron.distill_state import check_run_dir

        notes = check_paths(resolved)
        check_run_dir(resolved, resume)  # the run folder as the run would find it: exists, writable, resumable
        print(resolved.to_yaml(), end="")
        for note in notes:
            err_console.print(f"note: {note}", highlight=False)
        return
    from minitron.distill import train

    final = train(
        resolved, resume=resume, trust_remote_code=trust_remote_code, command=shlex.join(["minitron", *sys.argv[1:]])
    )
    if os.environ.get("RANK", "0") == "0":
        console.print(f"wrote [bold]{final}[/]")


from minitron.quickstart import Settings as _Quickstart  # noqa: E402  (plain dataclass: no heavy imports)

_QS = _Quickstart()


@app.command()
def quickstart(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("minitron-quickstart"),
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    steps: Annotated[int, typer.Option(help="Distillation steps.")] = _QS.steps,
    batch: Annotated[int, typer.Option(help="Blocks of 256 tokens per distillation step.")] = _QS.batch,
    samples: Annotated[int, typer.Option(help="Calibration blocks for importance.")] = _QS.samples,
    eval_limit: Annotated[int, typer.Option(help="Documents per evaluation task (lm-eval --limit).")] = _QS.eval_limit,
    tasks: Annotated[str, typer.Option(help="Evaluation tasks.")] = _QS.tasks,
) -> None:
    """The whole method on the bundled teacher: importance → prune to half by width → distill → eval → report."""
    import os
    import shlex

    # lm-eval draws tqdm bars of its own; rich draws the quickstart's (tqdm reads this when imported).
    os.environ.setdefault("TQDM_DISABLE", "1")
    from minitron import quickstart as qs

    qs.run(
        out, overwrite=overwrite, steps=steps, batch=batch, samples=samples, eval_limit=eval_limit, tasks=tasks,
        command=shlex.join(["minitron", *sys.argv[1:]]),
    )  # fmt: skip


@app.command()
def study(
    out: Annotated[Path, typer.Option("-o", "--out", help="Output folder.")] = Path("minitron-study"),
    teacher: Annotated[Optional[Path], typer.Option(help="Local teacher checkpoint (default: the bundled one).")] = None,
    text: Annotated[Optional[Path], typer.Option(help="Text file or folder; every tenth document is held out "
                                                      "(default: the bundled WikiText-2 train / valid).")] = None,
    quick: Annotated[bool, typer.Option(help="Smoke-test sizes (under 5 minutes on 2 CPU cores).")] = False,
    seeds: Annotated[Optional[int], typer.Option(help="Seeds where a seed matters.")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Distillation steps of ablations 1-3.")] = None,
    retrain_steps: Annotated[Optional[int], typer.Option(help="Steps of each retraining run (ablation 4).")] = None,
    search_steps: Annotated[Optional[int], typer.Option(help="Distillation steps before re-ranking (ablation 5).")] = None,
    workers: Annotated[Optional[int], typer.Option(help="Processes that run the four parts side by side "
                                                        "(default: one per CPU core, at most 4).")] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
) -> None:
    """The papers' ablations on a teacher: importance, depth, width vs depth, retraining, search (study.md)."""
    from dataclasses import replace

    from minitron import study as st

    base = st.QUICK if quick else st.Settings()
    given = {"seeds": seeds, "steps": steps, "retrain_steps": retrain_steps, "search_steps": search_steps}
    settings = replace(base, **{k: v for k, v in given.items() if v is not None})
    done = st.run_study(out, teacher=teacher, text=text, quick=quick, settings=settings, workers=workers,
                        overwrite=overwrite)
    console.print(f"study: {done / 'study.md'} (results.json and plots/ beside it)")


def _usage_line(e: Exception) -> str:
    """click's message for a usage error (unknown verb or flag, a value of the wrong type, a missing argument)
    as one line, with where to look; click itself would print a usage block or a box."""
    ctx = getattr(e, "ctx", None)
    where = ctx.command_path if ctx is not None else "minitron"
    return f"{e.format_message()} — see `{where} --help`"


def main() -> None:
    """Console-script entry: user errors, the CLI layer's usage errors included, become one line on stderr
    and exit code 2; Ctrl-C and SIGTERM unwind (temporary outputs removed) and exit 130 and 143."""
    try:
        with interrupt_on_signals():
            # standalone_mode=False: click's own errors reach us instead of being printed as a usage block.
            code = app(standalone_mode=False, prog_name="minitron")
    except click.NoArgsIsHelpError as e:
        e.show()  # plain `minitron`: the help, as users expect, with click's exit code for it
        sys.exit(e.exit_code)
    except UserError as e:
        _error(e.line(), EXIT_USER_ERROR)
    except click.ClickException as e:
        _error(_usage_line(e), EXIT_USER_ERROR if isinstance(e, click.UsageError) else e.exit_code)
    except Interrupted as e:
        err_console.print(f"[bold red]interrupted[/] ({e}): no half-written output was left", highlight=False)
        sys.exit(e.exit_code)
    except Exception as e:  # a full disk is the user's to fix; anything else is a bug and keeps its traceback
        full = full_disk_error(e)
        if full is None:
            raise
        _error(full.line(), EXIT_USER_ERROR)
    if isinstance(code, int) and code:
        sys.exit(code)


def _error(line: str, code: int) -> None:
    from rich.markup import escape

    err_console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
    sys.exit(code)


if __name__ == "__main__":
    main()

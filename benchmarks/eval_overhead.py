"""Does ``minitron eval`` add overhead to lm-eval? Throughput of ``minitron eval`` against lm-eval's own CLI
(``python -m lm_eval --model hf --model_args pretrained=DIR ...``) on the same model, tasks, data and limit.

Both sides run the same local task YAMLs (``eval/tasks``, data from ``--data-dir``; by default the samples
shipped in ``minitron/assets/data/eval``), so they send the same requests: MMLU 5-shot (the subjects present),
GSM8K 5-shot, HellaSwag 0-shot, WikiText. lm-eval's CLI takes one ``--num_fewshot`` for every task, so it
runs twice (MMLU + GSM8K at 5 shots, HellaSwag + WikiText at 0); ``minitron eval`` runs once.

Two times per run, both medians over ``--repeats`` rounds that alternate the two tools (so that a shared
machine's load hits both alike):

* **end to end**: each process timed from start to exit (imports, model load, request building, the model
  calls, writing results): the time a user waits. lm-eval's two processes are added up, which charges it
  a second start-up: read the in-tool row for the overhead of minitron's own code.
* **in tool**: what each tool reports itself, from just before loading the model to the end: minitron's
  ``timing.total_s``, and lm-eval's ``total_evaluation_time_seconds`` (summed over its two runs).

Throughput = lm-eval requests answered per second of that time (the same requests on both sides); ratio =
lm-eval time / minitron time (≥ 1: minitron is not slower). The metric values of both tools are compared
too: equal values show that both really ran the same requests. Batch sizes: each tool's ``auto`` and a
fixed size; ``minitron eval --batch-size auto`` must not be slower than the fixed one.

Run by hand, never as a test (~10 minutes on 2 CPU cores):

    python benchmarks/eval_overhead.py                          # the bundled teacher, shipped samples
    python benchmarks/eval_overhead.py --model /path/to/ckpt --data-dir /path/to/data --limit 2

``--model random`` builds a random Llama with a byte-level tokenizer instead (``--hidden``/``--layers``,
context ``--max-len`` 1024). The bundled teacher's context is 256 tokens and lm-eval's CLI generates up to 256
tokens for GSM8K, which it refuses for such a model (``minitron eval`` generates at most half the context
there, so the two tools would not send the same requests): run the teacher with
``--tasks mmlu,hellaswag,wikitext``, or use ``--model random`` for all four tasks.
Results go to ``benchmarks/results/eval_overhead_{cpu,cuda}.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import machine  # benchmarks/machine.py: this folder is on sys.path when run as a script

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).parent / "results"


def make_random_model(path: Path, hidden: int, layers: int, max_len: int, dtype: str = "float32", device: str = "cpu") -> None:
    """A random Llama of the given width/depth and a lossless byte-level tokenizer."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for special in ("<s>", "</s>", "<pad>"):
        vocab[special] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast), hidden_size=hidden, intermediate_size=int(hidden * 2.75), num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), max_position_embeddings=max_len,
        bos_token_id=fast.bos_token_id, eos_token_id=fast.eos_token_id, pad_token_id=fast.pad_token_id,
    )  # fmt: skip
    with torch.device(device):  # a 1B model builds in seconds on a GPU, in minutes on a CPU
        LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(path)
    fast.save_pretrained(path)


def describe(model: Path) -> str:
    from minitron.families import Shape
    from minitron.inputs import read_config

    shape = Shape.from_config(read_config(model))
    return (f"{model.name}: Llama, hidden {shape.hidden}, {shape.layers} layers, {shape.heads} heads / "
            f"{shape.kv_heads} KV, vocab {shape.vocab}, {shape.counts()['total']:,} parameters")  # fmt: skip


def check_context(model: Path, tasks: list[str]) -> None:
    from minitron.inputs import read_config

    context = read_config(model).get("max_position_embeddings", 0)
    if "gsm8k" in tasks and context <= 256:
        sys.exit(f"{model}: a {context}-token context cannot hold GSM8K's 256 generated tokens (lm-eval refuses it); "
                 "pass --tasks mmlu,hellaswag,wikitext or --model random")  # fmt: skip


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    elapsed = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return elapsed


def minitron_run(model: Path, args, batch: str, out: Path, env) -> dict:
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "minitron.cli", "eval", str(model), "-o", str(out), "--data-dir", str(args.data_dir),
           "--limit", str(args.limit), "--batch-size", batch, "--device", args.device, "--dtype", args.dtype,
           "--tasks", ",".join(args.tasks)]  # fmt: skip
    wall = timed(cmd, env)
    results = json.loads(out.read_text())
    return {
        "wall_s": wall,
        "tool_s": results["minitron"]["timing"]["total_s"],
        "requests": results["minitron"]["settings"]["requests"],
        "metrics": metrics(results),
    }


def lm_eval_groups(tasks: list[str], mmlu_tasks: str) -> list[tuple[str, int]]:
    """lm-eval CLI calls for ``tasks``: one per shot setting (MMLU and GSM8K 5-shot, the others 0-shot)."""
    named = {"mmlu": mmlu_tasks}
    five = [named.get(t, t) for t in tasks if t in ("mmlu", "gsm8k")]
    zero = [t for t in tasks if t in ("hellaswag", "wikitext")]
    return [(",".join(group), shots) for group, shots in ((five, 5), (zero, 0)) if group]


def lm_eval_run(model: Path, args, batch: str, out: Path, env, groups: list[tuple[str, int]]) -> dict:
    wall = tool = 0.0
    found: dict[str, float] = {}
    for tasks, shots in groups:
        folder = out / f"{shots}-shot"
        cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args", f"pretrained={model},dtype={args.dtype}",
               "--device", args.device, "--include_path", str(ROOT / "eval" / "tasks"),
               "--metadata", json.dumps({"data_dir": str(args.data_dir)}), "--tasks", tasks, "--num_fewshot", str(shots),
               "--limit", str(args.limit), "--batch_size", batch, "--output_path", str(folder)]  # fmt: skip
        wall += timed(cmd, env)
        newest = max(folder.rglob("results_*.json"), key=lambda p: p.stat().st_mtime)
        results = json.loads(newest.read_text())
        tool += float(results["total_evaluation_time_seconds"])
        found |= metrics(results)
    return {"wall_s": wall, "tool_s": tool, "metrics": found}


def metrics(results: dict) -> dict[str, float]:
    """Every numeric metric of every task (``task/metric``), to check that both tools computed the same."""
    return {
        f"{task}/{key}": float(value)
        for task, values in results["results"].items()
        for key, value in values.items()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and "stderr" not in key
    }


def compare(ours: dict[str, float], theirs: dict[str, float]) -> dict:
    common = sorted(set(ours) & set(theirs))
    diffs = [abs(ours[k] - theirs[k]) / max(1.0, abs(theirs[k])) for k in common if math.isfinite(theirs[k])]
    return {"common_metrics": len(common), "max_relative_diff": max(diffs, default=float("nan"))}


def main() -> None:
    from minitron.assets import eval_data_dir
    from minitron.eval_data import mmlu_subjects

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint folder (default: the bundled teacher), or 'random'")
    parser.add_argument("--data-dir", type=Path, default=None, help="default: the shipped eval samples")
    parser.add_argument("--tasks", default="mmlu,gsm8k,hellaswag,wikitext", help="comma-separated, as minitron eval")
    parser.add_argument("--limit", type=int, default=2, help="documents per task (per MMLU subject)")
    parser.add_argument("--batch-sizes", default="auto,8", help="compared batch sizes, both tools")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256, help="--model random: width")
    parser.add_argument("--layers", type=int, default=4, help="--model random: depth")
    parser.add_argument("--max-len", type=int, default=1024, help="--model random: context length")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", help="both tools load the model in this dtype")
    parser.add_argument("--out", type=Path, default=None, help="output path without suffix")
    parser.add_argument("--note", default="", help="what else the machine was doing (goes into the results)")
    args = parser.parse_args()
    args.data_dir = (args.data_dir or eval_data_dir()).resolve()
    args.tasks = args.tasks.split(",")
    subjects = mmlu_subjects(args.data_dir)
    # lm-eval names the whole benchmark "mmlu" only when all 57 subjects are there; minitron eval groups
    # the subjects present under "mmlu" itself. Either way the same per-subject tasks run.
    mmlu_tasks = "mmlu" if len(subjects) == 57 else ",".join(f"mmlu_{s}" for s in subjects)
    groups = lm_eval_groups(args.tasks, mmlu_tasks)
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))  # keep carried packages
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": path}  # fmt: skip
    load_before = os.getloadavg()

    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "random":
            model = Path(tmp) / "random-llama"
            make_random_model(model, args.hidden, args.layers, args.max_len, args.dtype, args.device)
        else:
            from minitron.assets import teacher_path

            model = Path(args.model).resolve() if args.model else teacher_path()
        check_context(model, args.tasks)
        model_text = describe(model) + (" (random weights, byte-level tokenizer)" if args.model == "random" else "")
        rows = []
        for batch in args.batch_sizes.split(","):
            ours, theirs = [], []
            for r in range(args.repeats):  # alternate the two tools so that machine load hits both alike
                first, second = ("minitron", "lm_eval") if r % 2 == 0 else ("lm_eval", "minitron")
                for tool in (first, second):
                    if tool == "minitron":
                        ours.append(minitron_run(model, args, batch, Path(tmp) / "minitron.json", env))
                    else:
                        theirs.append(lm_eval_run(model, args, batch, Path(tmp) / f"lm_eval-{batch}-{r}", env, groups))
                print(f"batch {batch}, round {r + 1}: minitron {ours[-1]['wall_s']:.1f} s "
                      f"(in tool {ours[-1]['tool_s']:.1f}), lm_eval {theirs[-1]['wall_s']:.1f} s "
                      f"(in tool {theirs[-1]['tool_s']:.1f})", flush=True)  # fmt: skip
            requests = ours[0]["requests"]
            row = {"batch_size": batch, "requests": requests, "agreement": compare(ours[0]["metrics"], theirs[0]["metrics"])}
            for kind in ("wall", "tool"):
                mine = statistics.median(run[f"{kind}_s"] for run in ours)
                other = statistics.median(run[f"{kind}_s"] for run in theirs)
                row[kind] = {
                    "minitron_s": mine, "lm_eval_s": other, "ratio": other / mine,
                    "minitron_req_per_s": requests / mine, "lm_eval_req_per_s": requests / other,
                    "minitron_all_s": [run[f"{kind}_s"] for run in ours], "lm_eval_all_s": [run[f"{kind}_s"] for run in theirs],
                }  # fmt: skip
            rows.append(row)

    import lm_eval
    import torch

    auto = next((r for r in rows if r["batch_size"] == "auto"), None)
    fixed = [r for r in rows if r["batch_size"] != "auto"]
    record = {
        "machine": machine.describe(args.device),
        "note": args.note, "dtype": args.dtype, "load_average_before": load_before,
        "load_average_after": os.getloadavg(), "torch": torch.__version__, "lm_eval": lm_eval.__version__,
        "threads": args.threads, "model": model_text, "data_dir": str(args.data_dir),
        "mmlu_subjects": subjects, "tasks": args.tasks, "limit": args.limit, "repeats": args.repeats, "rows": rows,
        "command": " ".join(["python", "benchmarks/eval_overhead.py", *sys.argv[1:]]),
        # > 1: auto is faster than the fixed batch size (minitron's in-tool time).
        "minitron_auto_vs_fixed": {r["batch_size"]: r["tool"]["minitron_s"] / auto["tool"]["minitron_s"] for r in fixed} if auto else {},
    }  # fmt: skip
    stem = args.out or RESULTS / f"eval_overhead_{'cpu' if args.device == 'cpu' else 'cuda'}"
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    stem.with_suffix(".md").write_text(markdown(record))
    print(markdown(record))


def markdown(record: dict) -> str:
    subjects = record["mmlu_subjects"]
    task_names = {
        "mmlu": f"MMLU 5-shot ({len(subjects)} subject{'s' if len(subjects) > 1 else ''})",
        "gsm8k": "GSM8K 5-shot", "hellaswag": "HellaSwag 0-shot", "wikitext": "WikiText",
    }  # fmt: skip
    lines = [
        "# `minitron eval` against lm-eval's CLI",
        "",
        f"Machine: {record['machine']}" + (f"; {record['note']}" if record["note"] else "") + f". torch "
        f"{record['torch']}, lm-eval {record['lm_eval']}, {record.get('dtype', 'float32')}, {record['threads']} threads, load average "
        f"{record['load_average_before'][0]:.1f} before, {record['load_average_after'][0]:.1f} after.",
        f"Model: {record['model']}. Tasks: {', '.join(task_names[t] for t in record['tasks'])}, "
        f"`--limit {record['limit']}` per task, local data "
        f"(`{Path(record['data_dir']).name}`). Medians of {record['repeats']} rounds, tools alternated. "
        f"Command: `{record['command']}`.",
        "",
        "End to end = process start to exit (lm-eval's CLI needs two processes for the two shot settings); in tool "
        "= each tool's own timer from model load to the end. Ratio = lm-eval time / minitron time (≥ 1: minitron "
        "adds no overhead).",
        "",
        "| batch size | requests | time | minitron eval (s) | lm_eval CLI (s) | minitron req/s | lm_eval req/s | ratio |",
        "|---|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in record["rows"]:
        for kind, label in (("wall", "end to end"), ("tool", "in tool")):
            t = r[kind]
            lines.append(f"| {r['batch_size']} | {r['requests']} | {label} | {t['minitron_s']:.1f} | {t['lm_eval_s']:.1f} | "
                         f"{t['minitron_req_per_s']:.2f} | {t['lm_eval_req_per_s']:.2f} | **{t['ratio']:.2f}** |")  # fmt: skip
    lines.append("")
    for r in record["rows"]:
        a = r["agreement"]
        lines.append(f"- Batch {r['batch_size']}: {a['common_metrics']} metrics reported by both tools, largest "
                     f"relative difference {a['max_relative_diff']:.1e}.")  # fmt: skip
    for batch, speed in record["minitron_auto_vs_fixed"].items():
        lines.append(f"- `minitron eval --batch-size auto` vs `--batch-size {batch}` (in tool): {speed:.2f}× the speed "
                     f"({'not slower' if speed >= 1.0 else 'slower'}).")  # fmt: skip
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()

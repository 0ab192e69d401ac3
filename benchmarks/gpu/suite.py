"""The GPU suite: one call that proves distillation, importance and eval on a CUDA GPU (``run.sh`` runs this).

Steps, in order, each in its own process under its own time limit (so one slow step cannot eat the others),
each leaving JSON + Markdown in the output folder as soon as it has something:

1. ``wheels``: install the wheels carried in ``.whl/`` (``fetch_wheels.sh``; ``--no-deps`` into a folder
   put first on ``PYTHONPATH``) and import each module ``wheels.txt`` names; note the image's own versions.
2. ``tests``: ``pytest -m gpu`` on the whole test suite (with ``--device cpu`` the same tests on the CPU).
3. ``distill``: ``benchmarks/distill_step.py`` at the Llama-3.1-8B → Minitron-4B-Width shapes, several
   sequence lengths / micro-batches / activation checkpointing, then a profile of the fastest setting.
4. ``kd``: ``benchmarks/kd_loss.py`` at vocab 128,256, 8,192 and 32,768 tokens: chunked vs naive vs Liger
   vs nvidia-modelopt.
5. ``importance``: ``benchmarks/importance_speed.py``, hooked pass vs plain forward on the 8B shape.
6. ``eval``: ``benchmarks/eval_overhead.py``, ``minitron eval`` vs lm-eval's HFLM on a random ~1B Llama.

Then a summary table (``summary.md`` / ``summary.json``). The exit status is 0 only if every step finished
and every test passed. ``--bundle DIR`` also keeps ``DIR/results.tgz`` (the whole output folder),
``DIR/summary.md`` and ``DIR/run.log`` up to date after each step: three files, within what a device call
brings back. ``--small`` runs the same steps at toy shapes (the CPU rehearsal; ``tests/test_gpu_suite.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BENCH = ROOT / "benchmarks"
MODELS = HERE / "models"
TEACHER, STUDENT = MODELS / "llama-3.1-8b", MODELS / "llama-3.1-minitron-4b-width"
# The image's own packages whose versions matter to the steps (recorded, not installed).
IMAGE_PACKAGES = ("torch", "transformers", "accelerate", "huggingface_hub", "tokenizers", "safetensors", "triton",
                  "numpy", "pyarrow", "pandas", "fsspec", "pytest", "rich", "typer")  # fmt: skip
# Carried only for the comparisons (kd_loss lists them as not run without them): not a failure of the suite.
OPTIONAL = {"liger_kernel", "modelopt"}
# Toy shapes of the same families for --small: Llama-3.1 configs with width, depth and vocabulary cut down.
TINY_TEACHER = "hidden_size=128,intermediate_size=384,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,head_dim=32,vocab_size=2048"
TINY_STUDENT = "hidden_size=96,intermediate_size=256,num_hidden_layers=2,num_attention_heads=4,num_key_value_heads=2,head_dim=32,vocab_size=2048"


# Seconds per step. On an H200 (expected in brackets, from the FLOPs and bytes of each): wheels (20: the
# import check loads torch, transformers, lm-eval and Liger's Triton kernels), tests (30), distill: building
# 12.5B random parameters, 6 settings × 4 steps and a profile (90), kd (30), importance: an 8B forward over 32k
# tokens, 3 variants × 4 (40), eval: three tool processes (60). Their sum is the default --budget: 8 minutes,
# inside one device call of 9. The small (CPU rehearsal) limits are guards for a loaded 2-core machine.
BUDGETS = {"wheels": 60, "tests": 75, "distill": 140, "kd": 60, "importance": 60, "eval": 85}
BUDGETS_SMALL = {"wheels": 120, "tests": 240, "distill": 240, "kd": 240, "importance": 180, "eval": 300}


@dataclass
class Step:
    name: str
    budget_s: int  # its time limit; the suite's remaining time caps it too
    command: list[str]
    outputs: list[str] = field(default_factory=list)  # result stems (without suffix) it must leave
    env: dict[str, str] = field(default_factory=dict)


def wheel_table() -> list[tuple[str, str]]:
    """``(name==version, module)`` of each carried wheel, from ``wheels.txt``."""
    rows = []
    for line in (HERE / "wheels.txt").read_text().splitlines():
        fields = line.split("#", 1)[0].split()
        if fields:
            rows.append((fields[0], fields[1]))
    return rows


def gpu_test_files() -> list[str]:
    """The test modules that mark tests ``gpu``: collecting only them spares importing the whole suite."""
    return sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_*.py")
                  if re.search(r"mark\.gpu\b", p.read_text()))  # fmt: skip


def steps(args, out: Path) -> list[Step]:
    py = sys.executable
    cuda = args.device == "cuda"
    small = args.small
    threads = str(max(1, min(8, (os.cpu_count() or 2) // 2))) if cuda else "1"
    pytest = [py, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", "--junitxml", str(out / "tests.xml"),
              *gpu_test_files()]  # fmt: skip
    distill = [py, str(BENCH / "distill_step.py"), "--device", args.device, "--threads", threads, "--profile",
               "--teacher", str(TEACHER), "--student", str(STUDENT), "--out", str(out / "distill_step")]  # fmt: skip
    if small:
        distill += ["--teacher-override", TINY_TEACHER, "--student-override", TINY_STUDENT,
                    "--sweep", "64:1:off,64:1:on,128:2:on", "--steps", "2"]  # fmt: skip
    else:  # cheapest first, so that the likely results come before the settings that may run out of memory
        distill += ["--sweep", "4096:1:off,4096:1:on,8192:1:on,4096:2:on,8192:1:off,4096:2:off", "--steps", "3"]
    kd = [py, str(BENCH / "kd_loss.py"), "--device", args.device, "--threads", threads, "--out", str(out / "kd_loss")]
    if small:
        kd += ["--vocab", "2048", "--student-hidden", "32", "--teacher-hidden", "48", "--tokens", "256",
               "--naive-tokens", "256", "--time-tokens", "256", "--chunk-size", "64", "--repeats", "1"]  # fmt: skip
    else:
        kd += ["--dtype", "bfloat16", "--vocab", "128256", "--student-hidden", "3072", "--teacher-hidden", "4096",
               "--tokens", "8192", "--naive-tokens", "8192", "32768", "--time-tokens", "8192", "32768",
               "--chunk-size", "1024", "4096", "--repeats", "3"]  # fmt: skip
    importance = [py, str(BENCH / "importance_speed.py"), "--device", args.device, "--threads", threads,
                  "--config", str(TEACHER), "--parts", "speed", "--out", str(out / "importance_speed")]  # fmt: skip
    if small:
        importance += ["--override", TINY_TEACHER, "--samples", "4", "--seq-len", "64", "--batch-size", "2", "--repeats", "2"]
    else:
        importance += ["--dtype", "bfloat16", "--samples", "8", "--seq-len", "4096", "--batch-size", "2", "--repeats", "3"]
    evaluation = [py, str(BENCH / "eval_overhead.py"), "--device", args.device, "--threads", threads, "--model", "random",
                  "--repeats", "1", "--out", str(out / "eval_overhead")]  # fmt: skip
    if small:
        evaluation += ["--hidden", "64", "--layers", "2", "--max-len", "512", "--limit", "1",
                       "--tasks", "wikitext", "--batch-sizes", "4"]  # fmt: skip
    else:  # hidden 2048 × 22 layers: 0.99B parameters
        evaluation += ["--hidden", "2048", "--layers", "22", "--max-len", "2048", "--dtype", "bfloat16", "--limit", "4",
                       "--batch-sizes", "auto"]  # fmt: skip
    # Budgets (seconds) on an H200: the sum stays within --budget (480 s by default), ~9 min a call at most.
    budgets = BUDGETS_SMALL if small else BUDGETS
    rehearsal = {} if cuda else {"MINITRON_GPU_TESTS": "cpu"}  # gpu-marked tests run on the CPU instead of skipping
    return [
        Step("wheels", budgets["wheels"], [py, str(HERE / "suite.py"), "--wheels-step", "--out", str(out), *(["--site", args.site])]),
        Step("tests", budgets["tests"], pytest, env=rehearsal),
        Step("distill", budgets["distill"], distill, ["distill_step"]),
        Step("kd", budgets["kd"], kd, ["kd_loss"]),
        Step("importance", budgets["importance"], importance, ["importance_speed"]),
        Step("eval", budgets["eval"], evaluation, ["eval_overhead"]),
    ]


# --- step 1: the carried wheels ---------------------------------------------------------------------------------


def wheels_step(args) -> int:
    """Install ``.whl/*.whl`` into ``--site`` (CPython 3.12 only: the wheels are built for it), import each module."""
    out = Path(args.out)
    wheels = sorted((ROOT / ".whl").glob("*.whl"))
    record: dict = {"python": sys.version.split()[0], "site": args.site, "carried": [w.name for w in wheels]}
    if wheels and sys.version_info[:2] == (3, 12):
        done = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                               "--no-cache-dir", "--upgrade", "--target", args.site, *map(str, wheels)],
                              capture_output=True, text=True)  # fmt: skip
        record["install"] = "ok" if done.returncode == 0 else done.stderr.strip()[-2000:]
    else:
        why = "no .whl/ folder (run benchmarks/gpu/fetch_wheels.sh)" if not wheels else "wheels are for CPython 3.12"
        record["install"] = f"skipped: {why}; the import check runs on what this Python has"
    # One child imports everything (a Python start per module would cost more than the imports).
    code = (
        "import importlib, json, sys\n"
        "out = {}\n"
        "for module in sys.argv[1:]:\n"
        "    try:\n"
        "        m = importlib.import_module(module)\n"
        "        out[module] = {'ok': True, 'version': str(getattr(m, '__version__', '?')), 'from': str(m.__file__)}\n"
        "    except Exception as error:\n"
        "        out[module] = {'ok': False, 'error': f'{type(error).__name__}: {error}'}\n"
        "print('IMPORTS ' + json.dumps(out))\n"
    )
    table = wheel_table()
    modules = [module for _, module in table] + [name for name in IMAGE_PACKAGES if name not in dict(map(reversed, table))]
    done = subprocess.run([sys.executable, "-c", code, *modules], capture_output=True, text=True, env=child_env(args.site))
    found = next((json.loads(line[8:]) for line in done.stdout.splitlines() if line.startswith("IMPORTS ")), None)
    if found is None:
        found = {m: {"ok": False, "error": (done.stderr.strip().splitlines() or ["import check crashed"])[-1]} for m in modules}
    record["imports"] = {module: {"pin": pin, **found[module], "optional": module in OPTIONAL} for pin, module in table}
    image = {name: found[name]["version"] if found[name]["ok"] else "missing" for name in IMAGE_PACKAGES}
    record["image"] = image
    required_ok = all(r["ok"] for m, r in record["imports"].items() if m not in OPTIONAL)
    install_ok = record["install"] == "ok" or record["install"].startswith("skipped")
    record["ok"] = required_ok and install_ok
    (out / "wheels.json").write_text(json.dumps(record, indent=2) + "\n")
    lines = ["# Carried wheels", "", f"Python {record['python']}; install into `{args.site}`: {record['install']}", "",
             "| module | pin | imports | version / error |", "|---|---|---|---|"]  # fmt: skip
    for module, r in record["imports"].items():
        state = "yes" if r["ok"] else ("no (optional)" if r.get("optional") else "**no**")
        lines.append(f"| {module} | {r['pin']} | {state} | {r['version'] if r['ok'] else r['error']} |")
    lines += ["", "Image packages: " + ", ".join(f"{k} {v}" for k, v in image.items())]
    (out / "wheels.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if record["ok"] else 1


def child_env(site: str, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The steps' environment: the repository and the carried packages first on the path, offline."""
    path = [str(ROOT), site, os.environ.get("PYTHONPATH", "")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", "PYTHONUNBUFFERED": "1",
            "TOKENIZERS_PARALLELISM": "false",
            # Steps that try sizes until one runs out of memory go on in the same process: fewer stranded blocks.
            "PYTORCH_CUDA_ALLOC_CONF": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True"),
            **(extra or {})}  # fmt: skip


# --- running the steps ----------------------------------------------------------------------------------------------


def run_step(step: Step, limit: float, out: Path, site: str, say) -> dict:
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.monotonic()
    with log.open("w") as f:
        f.write("$ " + " ".join(step.command) + "\n")
        f.flush()
        proc = subprocess.Popen(step.command, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT,
                                env=child_env(site, step.env), start_new_session=True)  # fmt: skip
        try:
            code = proc.wait(timeout=limit)
            status = "ok" if code == 0 else f"failed (exit {code})"
        except subprocess.TimeoutExpired:
            _stop(proc)
            status = f"timed out after {limit:.0f} s"
    seconds = time.monotonic() - start
    missing = [stem for stem in step.outputs if not (out / f"{stem}.json").exists()]
    if status == "ok" and missing:
        status = "failed (no results: " + ", ".join(missing) + ")"
    if status != "ok":
        tail = log.read_text(errors="replace").splitlines()[-25:]
        say("\n".join("    | " + line for line in tail))
    return {"step": step.name, "status": status, "seconds": round(seconds, 1), "limit_s": round(limit), "log": str(log.relative_to(out))}


def _stop(proc: subprocess.Popen) -> None:
    """Stop the step and everything it started (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


# --- the summary --------------------------------------------------------------------------------------------------


def _json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def headline(name: str, out: Path) -> str:
    """One line of what a step measured, from its results file."""
    try:
        return _headline(name, out)
    except (KeyError, TypeError, ValueError, ZeroDivisionError, IndexError) as error:
        return f"(results unreadable: {type(error).__name__})"


def _headline(name: str, out: Path) -> str:
    if name == "wheels":
        r = _json(out / "wheels.json")
        if not r:
            return ""
        bad = [m + (" (optional)" if i.get("optional") else "") for m, i in r["imports"].items() if not i["ok"]]
        return f"{len(r['carried'])} carried; " + ("all import" if not bad else "not importing: " + ", ".join(bad))
    if name == "tests":
        t = test_counts(out / "tests.xml")
        return f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped" + (
            "; failed: " + ", ".join(t["failures"][:5]) if t["failures"] else "")  # fmt: skip
    if name == "distill":
        r = _json(out / "distill_step.json")
        ran = [x for x in (r or {}).get("results", []) if "error" not in x and "step_s" in x]
        if not ran:
            return "no setting ran"
        best = max(ran, key=lambda x: x["tokens_per_s"])
        mfu = f"MFU {100 * best['mfu']:.1f}% (goal ≥ 45%)" if best.get("mfu") is not None else "MFU n/a on CPU"
        oom = sum(1 for x in r["results"] if "error" in x)
        return (f"best: seq {best['seq_len']} × micro {best['micro']}, checkpointing "
                f"{'on' if best['checkpointing'] else 'off'}: {best['tokens_per_s']:,.0f} tokens/s, {mfu}, "
                f"{best['peak_memory_gib']:.1f} GiB" + (f"; {oom} setting(s) failed/out of memory" if oom else ""))  # fmt: skip
    if name == "kd":
        r = _json(out / "kd_loss.json")
        if not r:
            return ""
        n = max(int(k) for k in r["losses"])
        values = r["losses"][str(n)]
        spread = (max(values.values()) - min(values.values())) / max(abs(v) for v in values.values())
        rows = [m for m in r["memory"] if m["tokens"] == n and m["impl"] == "chunked" and "naive_bytes" in m]
        ratio = f"chunked/naive peak {min(m['ratio'] for m in rows):.3f}, " if rows else ""
        t = r["timing"][-1]["per_impl"] if r["timing"] else {}
        speeds = [v["speed_vs_naive_wall"] for k, v in t.items() if k.startswith("chunked/") and "speed_vs_naive_wall" in v]
        speed = f"speed {max(speeds):.2f}× naive, " if speeds else ""
        return f"{n:,} tokens: {ratio}{speed}{len(values)} implementations agree to {spread:.1e}"
    if name == "importance":
        r = _json(out / "importance_speed.json")
        return f"importance / plain forward = {r['speed']['importance_over_forward']:.3f}× (goal ≤ 1.10×)" if r else ""
    if name == "eval":
        r = _json(out / "eval_overhead.json")
        if not r:
            return ""
        row = r["rows"][0]["tool"]
        return (f"{r['rows'][0]['requests']} requests: minitron {row['minitron_req_per_s']:.2f} req/s, lm-eval "
                f"{row['lm_eval_req_per_s']:.2f} req/s (ratio {row['ratio']:.2f})")  # fmt: skip
    return ""


def test_counts(xml: Path) -> dict:
    counts = {"tests": 0, "passed": 0, "failed": 0, "skipped": 0, "failures": []}
    if not xml.exists():
        return counts
    for case in ET.parse(xml).getroot().iter("testcase"):
        counts["tests"] += 1
        if case.find("failure") is not None or case.find("error") is not None:
            counts["failed"] += 1
            counts["failures"].append(f"{case.get('classname', '')}::{case.get('name', '')}")
        elif case.find("skipped") is not None:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def write_summary(out: Path, args, rows: list[dict], machine_text: str, started: float) -> str:
    for row in rows:
        row["headline"] = headline(row["step"], out)
    tests = test_counts(out / "tests.xml")
    summary = {"machine": machine_text, "device": args.device, "small": args.small, "budget_s": args.budget,
               "elapsed_s": round(time.monotonic() - started, 1), "steps": rows, "tests": tests,
               "ok": all(r["status"] == "ok" for r in rows) and tests["failed"] == 0 and tests["passed"] > 0}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    lines = [f"# GPU suite{' (small shapes)' if args.small else ''}: {'PASSED' if summary['ok'] else 'FAILED'}", "",
             f"Machine: {machine_text}. {summary['elapsed_s']:.0f} s of a {args.budget} s budget.", "",
             "| step | status | s (limit) | result |", "|---|---|---:|---|"]  # fmt: skip
    lines += [f"| {r['step']} | {r['status']} | {r['seconds']:.0f} ({r['limit_s']}) | {r['headline']} |" for r in rows]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def bundle(out: Path, dest: Path) -> None:
    """``dest/results.tgz`` (the whole output folder) and ``dest/summary.md``: a device call brings back 8 files."""
    dest.mkdir(parents=True, exist_ok=True)
    partial = dest / "results.tgz.part"
    with tarfile.open(partial, "w:gz") as tar:
        tar.add(out, arcname=out.name)
    partial.replace(dest / "results.tgz")
    if (out / "summary.md").exists():
        (dest / "summary.md").write_text((out / "summary.md").read_text())


def describe_machine(device: str) -> str:
    code = "import sys; sys.path.insert(0, sys.argv[1]); import machine; print(machine.describe(sys.argv[2]))"
    done = subprocess.run([sys.executable, "-c", code, str(BENCH), device], capture_output=True, text=True)
    return done.stdout.strip() or f"unknown ({done.stderr.strip().splitlines()[-1:]})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--small", action="store_true", help="toy shapes: the CPU rehearsal")
    p.add_argument("--out", type=Path, default=None, help="results folder (default: runs/gpu-suite-DEVICE)")
    p.add_argument("--bundle", type=Path, default=None, help="also keep results.tgz, summary.md, run.log here")
    p.add_argument("--only", default="", help="comma-separated steps to run (default: all)")
    p.add_argument("--budget", type=int, default=None, help="seconds for all steps (default: the sum of their limits)")
    p.add_argument("--site", default="/tmp/minitron-gpu-site", help="where the carried wheels are installed")
    p.add_argument("--wheels-step", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.wheels_step:
        return wheels_step(args)
    if args.budget is None:
        args.budget = sum((BUDGETS_SMALL if args.small else BUDGETS).values())
    started = time.monotonic()
    out = (args.out or ROOT / "runs" / f"gpu-suite-{args.device}{'-small' if args.small else ''}").resolve()
    out.mkdir(parents=True, exist_ok=True)
    log_file = (args.bundle / "run.log") if args.bundle else None
    if args.bundle:
        args.bundle.mkdir(parents=True, exist_ok=True)

    def say(text: str) -> None:
        print(text, flush=True)
        if log_file:
            with log_file.open("a") as f:
                f.write(text + "\n")

    if args.device == "cuda" and not _cuda_available():
        say("no CUDA device here: run with --device cpu --small for the rehearsal")
        return 2
    machine_text = describe_machine(args.device)
    say(f"GPU suite on {machine_text}; results in {out}")
    wanted = set(filter(None, args.only.split(",")))
    rows: list[dict] = []
    for step in steps(args, out):
        if wanted and step.name not in wanted:
            continue
        left = args.budget - (time.monotonic() - started)
        if left < 15:
            rows.append({"step": step.name, "status": "skipped: out of time", "seconds": 0.0, "limit_s": 0, "log": ""})
            say(f"[{step.name}] skipped: out of time")
            continue
        limit = min(step.budget_s, left)
        say(f"[{step.name}] start (limit {limit:.0f} s)")
        rows.append(run_step(step, limit, out, args.site, say))
        say(f"[{step.name}] {rows[-1]['status']} in {rows[-1]['seconds']:.0f} s: {headline(step.name, out)}")
        write_summary(out, args, rows, machine_text, started)
        if args.bundle:
            bundle(out, args.bundle)
    text = write_summary(out, args, rows, machine_text, started)
    if args.bundle:
        bundle(out, args.bundle)
    say("")
    say(text)
    return 0 if json.loads((out / "summary.json").read_text())["ok"] else 1


def _cuda_available() -> bool:
    done = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip() == "True"


if __name__ == "__main__":
    sys.exit(main())

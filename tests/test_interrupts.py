"""The kill suite: ``prune``, ``distill`` and ``quickstart`` killed (SIGKILL and SIGTERM) at several points.

After each kill the output is absent or complete, never half-written; SIGTERM unwinds as Ctrl-C does and
exits 143; the rerun works and leaves no hidden siblings behind. Each run is the real command line
(``minitron.cli.main``) in a subprocess that sends itself the signal when it reaches the chosen call, so the
points are exact and the suite is deterministic.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from safetensors.torch import load_file
from tiny import save_tiny, tiny_tokenizer

from minitron import prune, quickstart
from minitron.distill import train
from minitron.families import Shape
from minitron.inputs import load_config
from minitron.plan import student_shape
from minitron.recipe import load_recipe

REPO = Path(__file__).parents[1]
TINY = REPO / "recipes" / "tiny-cpu.yaml"
DATA = REPO / "tests" / "data" / "shakespeare-8k.txt"

# argv: SIGNAL MODULE:FUNCTION NTH WHEN MATCH -- minitron arguments. The NTH call of MODULE.FUNCTION whose
# arguments' text contains MATCH sends SIGNAL to this process BEFORE or AFTER the real call runs.
_DRIVER = textwrap.dedent(
    """
    import functools, importlib, os, signal, sys
    import torch
    torch.set_num_threads(1)
    sig, target, nth, when, match = sys.argv[1:6]
    module_name, name = target.split(":")
    module = importlib.import_module(module_name)
    real, calls = getattr(module, name), [0]

    @functools.wraps(real)
    def hooked(*args, **kwargs):
        hit = match in repr((args, kwargs))
        calls[0] += hit
        fire = hit and calls[0] == int(nth)
        if fire and when == "before":
            os.kill(os.getpid(), getattr(signal, sig))
        result = real(*args, **kwargs)
        if fire and when == "after":
            os.kill(os.getpid(), getattr(signal, sig))
        return result

    setattr(module, name, hooked)
    import minitron.quickstart as qs  # the quickstart at test size (seq_len is no flag of the command)
    qs.run = functools.partial(qs.run, seq_len=64, heldout=8, show_progress=False)
    from minitron.cli import main
    sys.argv = ["minitron", *sys.argv[sys.argv.index("--") + 1 :]]
    main()
    """
)


def killed(sig, hook, *args, when="before", nth=1, match="", cache=None):
    """Run ``minitron ARGS``, killed by ``sig`` at the ``nth`` call of ``hook`` (``module:function``)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", **({"MINITRON_CACHE": str(cache)} if cache else {})}  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-c", _DRIVER, sig, hook, str(nth), when, match, "--", *map(str, args)],
        capture_output=True, text=True, cwd=REPO, env=env, timeout=300,
    )  # fmt: skip
    expected = -signal.SIGKILL if sig == "SIGKILL" else 143
    assert result.returncode == expected, result.stderr[-3000:]
    if sig == "SIGTERM":
        assert "interrupted (SIGTERM)" in result.stderr and "Traceback" not in result.stderr, result.stderr[-3000:]
    return result


def hidden(folder: Path) -> list[str]:
    """Names starting with a dot anywhere below ``folder``: the temporary siblings of every writer."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


# --- prune ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "llama"
    save_tiny("llama", path)
    return path


def prune_again(teacher: Path, out: Path, overwrite=False) -> None:
    shape = Shape.from_config(load_config(teacher))
    student = student_shape(shape, drop_layers=[1])
    prune.run(str(teacher), shape, student, out=out, drop_layers=[1], overwrite=overwrite, show_progress=False)


@pytest.mark.parametrize(
    "sig, hook, when, match",
    [
        ("SIGTERM", "minitron.prune:write_safetensors", "before", ""),  # half-way through the weights
        ("SIGKILL", "minitron.model_card:write", "after", ""),  # everything written but the rename
    ],
)
def test_a_killed_prune_leaves_no_output_and_the_rerun_cleans_up(tmp_path, teacher, sig, hook, when, match):
    out = tmp_path / "pruned"
    killed(sig, hook, "prune", teacher, "-o", out, "--drop-layers", "1", when=when, match=match)
    assert not out.exists()
    # SIGTERM removed the temporary folder on its way out; after SIGKILL it is there, hidden, until the rerun.
    assert (hidden(tmp_path) == []) == (sig == "SIGTERM")
    prune_again(teacher, out)
    assert hidden(tmp_path) == [] and load_file(out / "model.safetensors")


@pytest.mark.parametrize("sig", ["SIGKILL", "SIGTERM"])
def test_a_prune_killed_while_replacing_its_output_leaves_one_complete_output(tmp_path, teacher, sig):
    out = tmp_path / "pruned"
    prune_again(teacher, out)
    (out / "mark").write_text("the old one")
    # Killed right after the old output was moved aside, before the new one is renamed into place.
    killed(sig, "os:replace", "prune", teacher, "-o", out, "--drop-layers", "1", "--overwrite", match=".old-",
           when="after")  # fmt: skip
    if sig == "SIGTERM":  # held until the swap is done: the new output, complete, and nothing else
        assert not (out / "mark").exists() and load_file(out / "model.safetensors") and hidden(tmp_path) == []
        return
    assert not out.exists() and [name for name in hidden(tmp_path) if ".old-" in name]
    prune_again(teacher, out, overwrite=True)  # the old one is put back first, then replaced as asked
    assert not (out / "mark").exists() and load_file(out / "model.safetensors") and hidden(tmp_path) == []


# --- distill --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    for name, seed, layers in (("teacher", 0, 4), ("student", 1, 2)):
        save_tiny("llama", root / name, seed=seed, num_hidden_layers=layers)
        tiny_tokenizer().save_pretrained(root / name)
    return root


def distill_args(pair: Path, run: Path) -> list[str]:
    return [
        f"teacher.path={pair / 'teacher'}", f"student.path={pair / 'student'}", f"data.source={DATA}",
        f"data.cache_dir={pair / 'cache'}", f"output.dir={run}", "budget.steps=6", "checkpoint.every=2",
        "eval.every=0",
    ]  # fmt: skip


@pytest.mark.parametrize(
    "sig, hook, nth",
    [
        ("SIGKILL", "minitron.distill:train_step", 4),  # mid-training, after the checkpoint of step 2
        ("SIGTERM", "minitron.distill:train_step", 4),
        ("SIGKILL", "safetensors.torch:save_file", 3),  # while writing the checkpoint of step 4
        ("SIGKILL", "minitron.model_card:add_distillation_section", 1),  # the final model, all but renamed
    ],
)
def test_a_killed_distill_resumes_to_a_complete_model_without_leftovers(tmp_path, pair, sig, hook, nth):
    run = tmp_path / "run"
    killed(sig, hook, "distill", TINY, *distill_args(pair, run), nth=nth)
    final = run / "final"
    assert not final.exists() or (final / "config.json").is_file()  # absent or complete, never half
    assert not (run / "recipe.yaml").exists() or load_recipe(run / "recipe.yaml")
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line)  # every line is whole JSON
    train(load_recipe(TINY, distill_args(pair, run)), resume=True)
    assert load_file(final / "model.safetensors") and hidden(tmp_path) == []


# --- quickstart -----------------------------------------------------------------------------------------------------


def test_a_killed_quickstart_leaves_no_folder_and_the_rerun_cleans_up(tmp_path):
    out, cache = tmp_path / "qs", tmp_path / "cache"
    args = ["quickstart", "-o", out, "--steps", "4", "--batch", "2", "--samples", "4", "--eval-limit", "1",
            "--tasks", "wikitext"]  # fmt: skip
    # SIGTERM in the distillation stage: the temporary folder is removed on the way out.
    killed("SIGTERM", "minitron.distill:train_step", *args, nth=2, cache=cache)
    assert not out.exists() and hidden(tmp_path) == []
    # SIGKILL as the distilled model is saved: no cleanup code runs; the half-built folder stays hidden.
    killed("SIGKILL", "minitron.distill:save_final", *args, cache=cache)
    assert not out.exists() and [name for name in hidden(tmp_path) if name.startswith(".qs.tmp-")]

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINITRON_CACHE", str(cache))
        record = quickstart.run(out, steps=4, batch=2, samples=4, eval_limit=1, tasks="wikitext", seq_len=64,
                                heldout=8, show_progress=False)  # fmt: skip
    assert hidden(tmp_path) == [] and (out / "summary.json").is_file()
    # Paths recorded while the run was building in its temporary folder name the final one.
    assert record["models"]["pruned"]["path"] == str(out / "pruned")
    written = "".join(p.read_text() for p in out.rglob("*") if p.suffix in (".json", ".yaml", ".md", ".html"))
    assert ".qs.tmp-" not in written and str(out / "pruned") in written

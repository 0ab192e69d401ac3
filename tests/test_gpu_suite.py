"""The GPU suite (benchmarks/gpu) stays runnable: its CPU rehearsal passes end to end, the model configs it
carries are the shared ones, and its wheel list and time budget fit one device call."""

import json
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
GPU = REPO / "benchmarks" / "gpu"
SHARED = REPO / ".." / "shared" / "models"
sys.path.insert(0, str(GPU))
import suite  # noqa: E402  (benchmarks/gpu/suite.py runs as a script; its folder is not a package)


@pytest.mark.slow
def test_cpu_rehearsal_runs_every_step_and_leaves_results(tmp_path):
    out, bundle = tmp_path / "results", tmp_path / "bundle"
    env = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(GPU / "run.sh"), "--device", "cpu", "--small", "--out", str(out),
                           "--bundle", str(bundle)], capture_output=True, text=True, env=env, timeout=1200)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ok"] and [s["step"] for s in summary["steps"]] == ["wheels", "tests", "distill", "kd", "importance", "eval"]
    assert all(s["status"] == "ok" and s["headline"] for s in summary["steps"]), summary["steps"]
    # The gpu-marked tests ran (on the CPU), not skipped.
    assert summary["tests"]["passed"] >= 5 and summary["tests"]["skipped"] == 0 and summary["tests"]["failed"] == 0
    for stem in ("wheels", "distill_step", "kd_loss", "importance_speed", "eval_overhead"):
        assert json.loads((out / f"{stem}.json").read_text()) and (out / f"{stem}.md").read_text()
    distill = json.loads((out / "distill_step.json").read_text())
    assert len(distill["results"]) == 3 and distill["profile"]["top"]
    kd = json.loads((out / "kd_loss.json").read_text())
    values = kd["losses"]["256"]
    assert max(values.values()) - min(values.values()) < 1e-4 * max(values.values())
    # What a device call brings back: three files, the archive holding the whole folder.
    assert sorted(p.name for p in bundle.iterdir()) == ["results.tgz", "run.log", "summary.md"]
    with tarfile.open(bundle / "results.tgz") as tar:
        assert "results/summary.json" in tar.getnames()
    assert "PASSED" in (bundle / "summary.md").read_text()


def test_a_failing_step_fails_the_suite_and_says_why(tmp_path):
    code = suite.main(["--device", "cpu", "--small", "--only", "distill", "--out", str(tmp_path), "--budget", "1"])
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert code == 1 and not summary["ok"]
    [step] = summary["steps"]
    assert (step["step"], step["status"], step["headline"]) == ("distill", "skipped: out of time", "no setting ran")
    assert "FAILED" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(not SHARED.is_dir(), reason="needs ../shared/models")
@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.1-minitron-4b-width"])
def test_carried_model_configs_are_the_shared_ones(name):
    # The device machine gets the repository only: the suite carries copies of the two configs it builds.
    for file in ("config.json", "SOURCE.md"):
        assert (GPU / "models" / name / file).read_bytes() == (SHARED / name / file).read_bytes()


def test_wheel_list_pins_one_version_of_each_package_with_its_module():
    table = suite.wheel_table()
    names = [re.split(r"==", pin)[0].lower().replace("_", "-") for pin, _ in table]
    assert all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][A-Za-z0-9.]*", pin) for pin, _ in table)
    assert len(names) == len(set(names))  # two versions of one package stop the install on the device
    assert {"lm-eval", "datasets", "pydantic", "pydantic-core"} <= set(names)  # what the device image lacks
    assert all(module.isidentifier() for _, module in table)


def test_step_limits_fit_one_device_call():
    # One call runs at most 10 minutes; the suite must end well inside it, its limits included.
    assert sum(suite.BUDGETS.values()) <= 8 * 60
    assert set(suite.BUDGETS) == set(suite.BUDGETS_SMALL) == {"wheels", "tests", "distill", "kd", "importance", "eval"}
    assert "tests/test_gpu.py" in suite.gpu_test_files()

"""The notebooks in notebooks/ run top to bottom on the bundled teacher, offline, and say what they should.

Each notebook is executed with nbclient in a kernel of this very interpreter (so it sees the minitron under
test), from a temporary working directory, with one torch thread and the Hugging Face libraries offline.
The checks read what the notebooks wrote (artifacts and printed lines), not pinned loss values.
"""

import json
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import KernelManager
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
NAMES = ["01_quickstart.ipynb", "02_importance.ipynb", "03_llama_3.1_8b_to_minitron_4b.ipynb"]
CELL_TIMEOUT = 300  # seconds; the slowest cell (01's distillation) takes well under a minute


def execute(name: str, tmp_path: Path) -> nbformat.NotebookNode:
    """Run notebook ``name`` in ``tmp_path``/work and return it with its outputs (a failing cell raises)."""
    kernels = tmp_path / "kernels"
    spec = kernels / "minitron-test"
    spec.mkdir(parents=True)
    env = {
        # One intra-op thread: CI runs two test processes on two cores.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        # Nothing may touch the network.
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MINITRON_CACHE": str(tmp_path / "cache"),
    }
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "minitron test", "language": "python", "env": env})
    )
    manager = KernelManager(kernel_name="minitron-test", kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(kernels)]))
    work = tmp_path / "work"
    work.mkdir()
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    client = NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT, resources={"metadata": {"path": str(work)}})
    client.execute()
    for cell in notebook.cells:
        if cell.cell_type == "code":
            errors = [o for o in cell.outputs if o.output_type == "error"]
            assert not errors, f"{name}: {errors[0].ename}: {errors[0].evalue}"
    return notebook


def text_of(notebook: nbformat.NotebookNode) -> str:
    """Everything the notebook printed or displayed as plain text."""
    parts = []
    for cell in notebook.cells:
        for out in cell.get("outputs", []):
            if out.output_type == "stream":
                parts.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                parts.append(out.data.get("text/plain", ""))
    return "\n".join(parts)


def images(notebook: nbformat.NotebookNode) -> int:
    return sum(
        "image/png" in out.get("data", {})
        for cell in notebook.cells
        for out in cell.get("outputs", [])
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_notebooks_are_clean(name):
    """Valid nbformat 4, no outputs and no execution counts: results are made by running, never committed."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    nbformat.validate(notebook)
    for cell in notebook.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: a code cell has outputs"
    assert "widgets" not in notebook.metadata, f"{name}: widget state committed"


def test_quickstart_prunes_to_half_and_distillation_recovers(tmp_path):
    notebook = execute("01_quickstart.ipynb", tmp_path)
    run = tmp_path / "work" / "quickstart-run"

    from minitron.families import Shape
    from minitron.inputs import load_config
    from minitron.assets import teacher_path

    teacher = Shape.from_config(load_config(teacher_path())).counts()["total"]
    pruned = Shape.from_config(load_config(run / "student-pruned")).counts()["total"]
    assert abs(pruned / teacher - 0.5) <= 0.02  # --target 0.5x within the default ±2 %
    assert (run / "student-pruned" / "plan.json").is_file() and (run / "student-pruned" / "model.safetensors").is_file()

    metrics = [json.loads(line) for line in (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    evals = [m for m in metrics if "eval_kl" in m]
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 30
    assert evals[-1]["eval_kl"] < 0.8 * evals[0]["eval_kl"]  # distillation pulled the student toward the teacher

    results = {name: json.loads((run / "results" / f"{name}.json").read_text()) for name in ("teacher", "pruned", "distilled")}
    ppl = {name: r["minitron"]["summary"]["WikiText word ppl"]["value"] for name, r in results.items()}
    assert ppl["distilled"] < ppl["pruned"]
    assert results["distilled"]["minitron"]["lineage"]["teacher"] == str(teacher_path())
    leaderboard = (run / "report" / "leaderboard.md").read_text()
    assert "| distilled | student |" in leaderboard and (run / "report" / "leaderboard.html").is_file()  # named rows
    assert all("gsm8k" in r["results"] for r in results.values())
    assert "pruned student:" in text_of(notebook) and images(notebook) == 1


def test_importance_notebook_plots_every_kind_of_score(tmp_path):
    notebook = execute("02_importance.ipynb", tmp_path)
    assert images(notebook) == 4  # heads heatmap, neuron distributions, channels, layer scores
    text = text_of(notebook)
    assert "Spearman rank correlation" in text and "least important head per layer" in text


def test_llama_recipe_dry_runs_show_the_minitron_4b_shapes(tmp_path):
    notebook = execute("03_llama_3.1_8b_to_minitron_4b.ipynb", tmp_path)
    text = text_of(notebook)
    assert "8,030,261,248" in text  # minitron inspect on the config-only folder
    # --target 4.5B --axes width lists the published Width shape with its exact count.
    assert "hidden 3072, ffn 9216, heads 32, kv heads 8, head_dim 128, layers 32: 4,512,746,496 parameters (4.51B" in text
    # --drop-layers 16-31 and --axes depth: the Depth shape (16 layers, 4.54B).
    assert "4,540,469,248" in text
    assert "not run: needs a GPU" in text  # heavy cells are guarded on this CPU machine
    assert "9,961 steps" in text  # the 4B recipes validated: 94B tokens of 1152 × 8192

"""What every benchmark's results record about where they were measured, and how they are written.

The machine line (:func:`describe`), the load average around the run, the versions of the packages that
matter, paths shown relative to the repository (so results read the same on every machine), and the
``results/NAME.{json,md}`` pair. The benchmarks run as scripts (``python benchmarks/NAME.py``), so this
folder is on ``sys.path`` and they import this module as ``machine``; ``benchmarks/peers/common.py`` puts
it there for the peer comparisons.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo``, else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def ram_gb() -> float:
    with open("/proc/meminfo") as f:
        return int(next(line for line in f if line.startswith("MemTotal")).split()[1]) / 2**20


def gpu() -> dict:
    """The GPU's name, memory, driver and the CUDA / torch versions this process uses."""
    import torch

    props = torch.cuda.get_device_properties(0)
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)  # fmt: skip
        driver = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 and smi.stdout.strip() else "unknown"
    except (OSError, subprocess.TimeoutExpired):
        driver = "unknown"
    return {
        "name": props.name,
        "memory_gib": round(props.total_memory / 2**30, 1),
        "multiprocessors": props.multi_processor_count,
        "capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "cuda": torch.version.cuda,
        "torch": torch.__version__,
    }


def describe(device: str = "cpu") -> str:
    """``2-core CPU (AMD EPYC …), 24 GB RAM, no GPU``, or the GPU first (name, memory, driver, CUDA, torch)
    when ``device`` is CUDA."""
    host = f"{os.cpu_count()}-core CPU ({cpu_model()}), {ram_gb():.0f} GB RAM"
    if str(device).startswith("cuda"):
        g = gpu()
        return (f"{g['name']} ({g['memory_gib']} GiB, driver {g['driver']}), CUDA {g['cuda']}, torch {g['torch']}; "
                f"host {host}")  # fmt: skip
    return f"{host}, no GPU"


def load_average() -> list[float]:
    """The 1-, 5- and 15-minute load averages, rounded: what else the machine was doing."""
    return [round(x, 2) for x in os.getloadavg()]


def versions(*packages: str) -> dict[str, str]:
    """Installed versions of torch, transformers and ``packages`` (distribution names); ``"missing"`` for
    one that is not installed."""
    found = {}
    for name in ("torch", "transformers", *packages):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


def machine_line(record: dict, extra: str = "") -> str:
    """The first line of a results page: the machine, the load average before and after the run (``extra``
    after it), the versions; from a record with those keys."""
    versions = ", ".join(f"{k} {v}" for k, v in record["versions"].items())
    return (f"Machine: {record['machine']}; load average {record['load_average_before']} before, "
            f"{record['load_average_after']} after{extra}. Versions: {versions}.")  # fmt: skip


def shown(path: str | Path) -> str:
    """``path`` relative to the repository when it lies inside it (the bundled teacher), else as given."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(ROOT)) if resolved.is_relative_to(ROOT) else str(path)


def write(name: str, record: dict, markdown: Callable[[dict], list[str]]) -> None:
    """``results/NAME.json``, then ``NAME.md`` from ``markdown(record)``: the measurements are kept even if
    rendering them fails."""
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(json.dumps(record, indent=2) + "\n")
    (RESULTS / f"{name}.md").write_text("\n".join(markdown(record)) + "\n")
    print(f"wrote {RESULTS / name}.json and .md")

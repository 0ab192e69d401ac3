"""The one line every benchmark's results give for the machine they were measured on.

The benchmarks run as scripts (``python benchmarks/NAME.py``), so this folder is on ``sys.path`` and they
import this module as ``machine``.
"""

from __future__ import annotations

import os
import platform
import subprocess


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

"""The one line every benchmark's results give for the machine they were measured on.

The benchmarks run as scripts (``python benchmarks/NAME.py``), so this folder is on ``sys.path`` and they
import this module as ``machine``.
"""

from __future__ import annotations

import os
import platform


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


def describe(device: str = "cpu") -> str:
    """``2-core CPU (AMD EPYC …), 24 GB RAM, no GPU``, or the GPU's name first when ``device`` is CUDA."""
    host = f"{os.cpu_count()}-core CPU ({cpu_model()}), {ram_gb():.0f} GB RAM"
    if str(device).startswith("cuda"):
        import torch

        return f"{torch.cuda.get_device_name(0)}; host {host}"
    return f"{host}, no GPU"

"""Writing safetensors shards one tensor at a time, for :func:`minitron.prune.prune_checkpoint`.

``safetensors.torch.save_file`` needs a whole shard in memory (plus a byte copy of it in versions before
0.6). A pruned student's tensor names, dtypes and shapes are known from the plan before any weight is read,
so each shard's header can be written first and its tensors streamed after it, one at a time.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

# safetensors dtype names (the header's "dtype") and their torch dtypes.
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip


def write_safetensors(
    path: Path, entries: list[tuple[str, str, tuple[int, ...]]], tensors: Iterable[torch.Tensor]
) -> None:
    """Write a safetensors file whose tensors arrive one at a time.

    ``entries`` are (name, safetensors dtype, shape) in file order; ``tensors`` yields them in that order.
    The layout is the format's spec: little-endian u64 header length, JSON header (padded with spaces to 8
    bytes), then the raw tensors back to back, each at the offsets the header gives.
    """
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in entries:
        size = math.prod(shape) * DTYPES[dtype].itemsize
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for (name, dtype, shape), tensor in zip(entries, tensors, strict=True):
            if tuple(tensor.shape) != tuple(shape) or tensor.dtype != DTYPES[dtype]:
                raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, header says {shape} {dtype}")
            f.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def shard_groups(sizes: list[int], max_bytes: int) -> list[list[int]]:
    """Greedy split of tensors (by byte size, in order) into shards of at most ``max_bytes`` each (a tensor
    larger than that gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    used = 0
    for i, size in enumerate(sizes):
        if shards[-1] and used + size > max_bytes:
            shards.append([])
            used = 0
        shards[-1].append(i)
        used += size
    return shards

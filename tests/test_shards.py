"""The streamed safetensors writer: every dtype round-trips through safetensors' own reader, a tensor that does
not match its header entry is refused, and the greedy split into shards keeps order and size."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open

from minitron.shards import shard_groups, write_safetensors


def test_safetensors_writer_round_trips_every_dtype(tmp_path):
    tensors = {
        "a": torch.randn(3, 5).to(torch.bfloat16),
        "b": torch.randn(7, dtype=torch.float64),
        "c": torch.randint(-5, 5, (2, 3), dtype=torch.int8),
        "d": torch.zeros(0, 4),
        "e": torch.randn(2, 2).to(torch.float8_e4m3fn),
    }
    names = {torch.bfloat16: "BF16", torch.float64: "F64", torch.int8: "I8", torch.float32: "F32",
             torch.float8_e4m3fn: "F8_E4M3"}  # fmt: skip
    entries = [(k, names[v.dtype], tuple(v.shape)) for k, v in tensors.items()]
    write_safetensors(tmp_path / "x.safetensors", entries, iter(tensors.values()))
    with safe_open(tmp_path / "x.safetensors", "pt") as f:
        assert f.metadata() == {"format": "pt"}
        for k, v in tensors.items():
            assert torch.equal(f.get_tensor(k).view(torch.uint8), v.view(torch.uint8))
    with pytest.raises(RuntimeError, match="header says"):
        write_safetensors(tmp_path / "y.safetensors", entries[:1], iter([torch.zeros(3, 5)]))


def test_shards_keep_order_and_stay_under_the_limit():
    sizes = [4, 3, 2, 6, 1, 1, 9]
    groups = shard_groups(sizes, 6)
    assert [i for group in groups for i in group] == list(range(len(sizes)))  # every tensor once, in order
    assert groups == [[0], [1, 2], [3], [4, 5], [6]]  # 9 > 6: a shard of its own rather than an error
    assert all(sum(sizes[i] for i in group) <= 6 for group in groups if len(group) > 1)
    assert shard_groups([1, 1, 1], 10) == [[0, 1, 2]]

"""The processes and the data of a ``minitron distill`` run (:mod:`minitron.distill`): who this process is,
the token cache, and which blocks every process reads at every step.

Processes come from the launcher (``torchrun`` or ``accelerate launch``: both set ``RANK``/``WORLD_SIZE``);
the backend is NCCL on GPUs and gloo on CPU. The data is tokenized once per (source, tokenizer), cached as a
flat token stream and read by position, so that a resumed run reads exactly what the uninterrupted one would
have (:class:`Blocks`).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor

from minitron.artifacts import atomic_dir
from minitron.errors import UserError
from minitron.recipe import Data


# --- processes ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class World:
    """This process's place among the training processes."""

    rank: int
    size: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group the launcher set up (``WORLD_SIZE`` > 1), or run alone."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank=dist.get_rank() if size > 1 else 0, size=size, device=device)


def all_sum(tensor: Tensor, world: World) -> Tensor:
    if world.size > 1:
        dist.all_reduce(tensor)
    return tensor


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


# --- data: tokenized once, cached, read by position -----------------------------------------------------------


# Documents per tokenizer call: one fast-tokenizer call amortised over many documents.
_TOKENIZE_BATCH = 1024


def cache_root(data: Data) -> Path:
    if data.cache_dir:
        return Path(data.cache_dir).expanduser()
    return Path(os.environ.get("MINITRON_CACHE", "~/.cache/minitron")).expanduser() / "tokens"


def packed_blocks(data: Data, tokenizer: Any, world: World) -> np.ndarray:
    """The data as ``[blocks, seq_len]`` token ids (a read-only memory map of the cached token stream).

    Documents are tokenized once per (data source, tokenizer) and cached as a flat ``uint32`` stream, so
    a second run, a resume or another ``seq_len`` costs nothing; the last partial block is dropped.
    """
    folder = cache_root(data) / _data_key(data, tokenizer)
    cached = (folder / "meta.json").is_file()
    barrier(world)  # every process has looked before the main one writes: all take the same branch
    if not cached:
        if world.main:
            _tokenize_to(folder, data, tokenizer)
        barrier(world)
    meta = json.loads((folder / "meta.json").read_text())
    stream = np.memmap(folder / "tokens.u32", dtype=np.uint32, mode="r", shape=(meta["tokens"],))
    blocks = meta["tokens"] // data.seq_len
    return stream[: blocks * data.seq_len].reshape(blocks, data.seq_len)


def _data_key(data: Data, tokenizer: Any) -> str:
    source = Path(data.source)
    if source.exists():
        files = sorted(source.rglob("*")) if source.is_dir() else [source]
        # Size and modification time stand for the content (as make does): hashing a corpus of billions
        # of tokens on every start would cost more than the check saves.
        identity: Any = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    else:
        identity = {"hub": data.source, "split": data.split}
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    key = json.dumps({"format": 1, "source": identity, "tokenizer": vocab, "separator": _separator(tokenizer)})
    return hashlib.sha256(key.encode()).hexdigest()[:20]


def _separator(tokenizer: Any) -> list[int]:
    # EOS between documents as in pre-training; BOS for a tokenizer without EOS.
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []


def _tokenize_to(folder: Path, data: Data, tokenizer: Any) -> None:
    from minitron.data import SUFFIXES, load_texts
    from minitron.report_console import progress

    source = Path(data.source)
    # A folder is read one file at a time, so that a corpus of many shards never sits in memory whole.
    files = sorted(p for p in source.rglob("*") if p.suffix in SUFFIXES and p.stat().st_size) if source.is_dir() else []
    parts = [lambda f=f: load_texts(f) for f in files] or [lambda: load_texts(data.source, split=data.split)]
    separator = _separator(tokenizer)
    tokens = documents = seen = 0
    with atomic_dir(folder, overwrite=True) as tmp, progress() as bar:
        task = bar.add_task("tokenizing", total=None)
        with (tmp / "tokens.u32").open("wb") as out:
            for read in parts:
                texts = read()
                seen += len(texts)
                bar.update(task, total=seen)
                for start in range(0, len(texts), _TOKENIZE_BATCH):
                    chunk = texts[start : start + _TOKENIZE_BATCH]
                    ids = tokenizer(chunk, add_special_tokens=False)["input_ids"]
                    stream = np.fromiter((i for doc in ids for i in [*doc, *separator]), dtype=np.uint32)
                    stream.tofile(out)
                    tokens, documents = tokens + len(stream), documents + len(chunk)
                    bar.advance(task, len(chunk))
        meta = {"tokens": tokens, "documents": documents, "source": data.source, "split": data.split}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2))


class Blocks:
    """Which blocks every process reads at every step: a pure function of (seed, step), so a resumed run
    reads exactly what the uninterrupted one would have.

    A seeded region of ``reserve`` blocks is kept out of training; evaluation reads its first ``heldout``
    (``eval.blocks``). Training walks the rest in a fresh seeded order each epoch; step ``s`` takes global
    positions ``[s·G, (s+1)·G)`` of that endless stream, process ``r`` the ``r``-th contiguous share of
    them, cut into micro-batches. The region is the run's own (``eval.blocks`` when it started, recorded in
    its checkpoints, :func:`resumed_reserve`): were it cut at ``eval.blocks``, a resume that changes
    ``eval.blocks`` would train on other blocks and evaluate on blocks already trained on.
    """

    def __init__(self, blocks: np.ndarray, *, heldout: int, seed: int, reserve: int | None = None):
        reserve = heldout if reserve is None else reserve
        if heldout > reserve:
            raise UserError(
                f"{heldout} is more than the {reserve} blocks this run has held out of training since it began",
                where="eval.blocks",
                fix=f"resume with eval.blocks ≤ {reserve} (more would evaluate on blocks already trained on), "
                "or start a new run",
            )
        if len(blocks) <= reserve:
            raise UserError(
                f"the data packs into {len(blocks)} blocks, not more than the {reserve} held out for evaluation",
                where="data.source",
                fix="use more text, a shorter data.seq_len or fewer eval.blocks",
            )
        self.blocks, self.seed, self.reserve = blocks, seed, reserve
        order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed)).numpy()
        self.heldout, self.train = np.sort(order[:heldout]), order[reserve:]
        self._epochs: dict[int, np.ndarray] = {}

    def check_batch(self, global_batch: int) -> None:
        """Refuse a step larger than the training blocks: it would read blocks twice in one step, and its
        size, not the data's, would set the memory (batch.micro 100000 on 100 blocks fills any machine)."""
        if global_batch > len(self.train):
            raise UserError(
                f"a step of {global_batch} blocks is more than the {len(self.train)} blocks there are to train on",
                where="batch.global", fix=f"set batch.global (and batch.micro) to at most {len(self.train)}, or use more text",
            )  # fmt: skip

    def _epoch(self, epoch: int) -> np.ndarray:
        if epoch not in self._epochs:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 1)
            self._epochs = {epoch: self.train[torch.randperm(len(self.train), generator=generator).numpy()]}
        return self._epochs[epoch]

    def _read(self, ids: np.ndarray) -> Tensor:
        return torch.from_numpy(self.blocks[np.sort(ids)].astype(np.int64))

    def step(self, step: int, global_batch: int, micro: int, world: World) -> list[Tensor]:
        share = global_batch // world.size
        start = step * global_batch + world.rank * share
        positions = np.arange(start, start + share)
        ids = np.array([self._epoch(int(p) // len(self.train))[int(p) % len(self.train)] for p in positions])
        return [self._read(ids[i : i + micro]) for i in range(0, share, micro)]

    def evaluation(self, micro: int, world: World) -> list[Tensor]:
        # Every process must run the same number of forwards (FSDP gathers weights in each): the held-out
        # blocks that do not divide evenly among processes are left out.
        share = len(self.heldout) // world.size
        if share == 0:
            raise UserError(
                f"{len(self.heldout)} held-out blocks cannot be shared among {world.size} processes",
                where="eval.blocks",
                fix=f"set eval.blocks to at least {world.size}",
            )
        ids = self.heldout[world.rank * share : (world.rank + 1) * share]
        return [self._read(ids[i : i + micro]) for i in range(0, share, micro)]

"""The two passes that feed the importance hooks, and the LM loss for ``--layer-loss``.

* whole model (:func:`whole_pass`): the model's own forward, one pass per batch;
* layer by layer (:func:`sweep_pass`): the model's own forward runs once per batch with its decoder
  layers replaced by probes, which capture the embeddings and the arguments each layer receives (rotary
  cos/sin, masks, including per-layer sliding-window masks), so every family's own code builds them;
  then one layer at a time is put on the device (:class:`ResidentLayers` moves an in-memory layer,
  :class:`CheckpointLayers` loads it from safetensors into a meta-device model) and applied to the carried
  hidden states of a chunk of samples. Both give the same scores (tested for every family).
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.errors import UserError
from minitron.families import Shape, assemble, logits_divisor


# --- LM loss (for --layer-loss) ---------------------------------------------------------------------------------


class LossSums:
    """Summed next-token NLL of the full model and of each layer-skipped variant, and the token count."""

    def __init__(self, layers: int):
        self.base: torch.Tensor | float = 0.0
        self.skipped: list[torch.Tensor | float] = [0.0] * layers
        self.tokens = 0

    def rise(self) -> torch.Tensor:
        base = torch.as_tensor(self.base, dtype=torch.float64).cpu() / self.tokens
        return torch.stack([torch.as_tensor(s, dtype=torch.float64).cpu() / self.tokens - base for s in self.skipped]).float()


def nll_sum(hidden: torch.Tensor, ids: torch.Tensor, head: nn.Module, divisor: float, chunk: int = 1024) -> torch.Tensor:
    """Summed next-token NLL of ``ids [B, S]`` from final hidden states ``[B, S, D]``, in chunks of
    positions so that the ``[tokens, vocab]`` logits of a long sequence never exist at once."""
    h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
    target = ids[:, 1:].reshape(-1)
    total = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for start in range(0, target.numel(), chunk):
        logits = head(h[start : start + chunk]).float() / divisor
        t = target[start : start + chunk, None]
        total += (torch.logsumexp(logits, dim=-1) - logits.gather(1, t)[:, 0]).sum(dtype=torch.float64)
    return total


class _Skip(nn.Module):
    """Stands in for a decoder layer to measure the model without it: output = input."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


@contextlib.contextmanager
def _skipping(layers: nn.ModuleList, i: int) -> Iterator[None]:
    layer = layers[i]
    layers[i] = _Skip()
    try:
        yield
    finally:
        layers[i] = layer


# --- the two passes -------------------------------------------------------------------------------------------


def whole_pass(model, blocks, batch_size, recorder, losses, device, advance) -> None:
    """The model's own forward, one pass per batch; skipped-layer passes only for ``--layer-loss``."""
    base, head, divisor = model.model, model.get_output_embeddings(), logits_divisor(model.config)
    for start in range(0, len(blocks), batch_size):
        ids = blocks[start : start + batch_size].to(device)
        recorder.active = True
        hidden = base(input_ids=ids, use_cache=False).last_hidden_state
        recorder.active = False
        if losses is not None:
            losses.base = losses.base + nll_sum(hidden, ids, head, divisor)
            for i in range(len(base.layers)):
                with _skipping(base.layers, i):
                    skipped = base(input_ids=ids, use_cache=False).last_hidden_state
                losses.skipped[i] = losses.skipped[i] + nll_sum(skipped, ids, head, divisor)
            losses.tokens += ids.shape[0] * (ids.shape[1] - 1)
        advance(ids.numel())


class _Probe(nn.Module):
    """Stands in for decoder layer ``index`` during the probe pass: records what the model hands it
    (layer 0 also the embeddings) and passes the hidden states through untouched."""

    def __init__(self, index: int, store: dict):
        super().__init__()
        self.index, self.store = index, store

    def forward(self, hidden_states, *args, **kwargs):
        if self.index == 0:
            self.store["hidden"] = hidden_states
        self.store["calls"].append((args, kwargs))
        return hidden_states


def _probe(base: nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, list]:
    """Embeddings of ``ids`` and the (args, kwargs) each decoder layer gets, built by the model's forward."""
    store: dict[str, Any] = {"calls": []}
    layers = list(base.layers)
    try:
        for i in range(len(layers)):
            base.layers[i] = _Probe(i, store)
        base(input_ids=ids, use_cache=False)
    finally:
        for i, layer in enumerate(layers):
            base.layers[i] = layer
    return store["hidden"], store["calls"]


def sweep_pass(model, blocks, batch_size, recorder, losses, device, layer_source, chunk_samples, advance) -> None:
    """Layer by layer: for each chunk of samples, carry its hidden states through one layer at a time.

    Every accumulator still receives the batches in the same order as in the whole-model pass, so the
    scores are the same. With ``--layer-loss`` each skipped-layer variant is carried alongside (its state
    is the main state as it entered the skipped layer), so weights are visited once per chunk.
    """
    base, head, divisor = model.model, model.get_output_embeddings(), logits_divisor(model.config)
    n_layers = len(base.layers)
    for chunk_start in range(0, len(blocks), chunk_samples):
        chunk = blocks[chunk_start : chunk_start + chunk_samples]
        batches = [chunk[i : i + batch_size].to(device) for i in range(0, len(chunk), batch_size)]
        recorder.active = False
        states, calls, shared = [], [], {}
        for ids in batches:
            hidden, layer_calls = _probe(base, ids)
            states.append(hidden)
            # What the layers get besides hidden states (rotary cos/sin, masks) depends only on the batch
            # shape for unpadded blocks at positions 0..S-1: keep one copy per shape, since an eager
            # attention mask alone is [B, 1, S, S].
            calls.append(shared.setdefault(tuple(ids.shape), layer_calls))
        variants: dict[int, list[torch.Tensor]] = {}
        for i in range(n_layers):
            with layer_source.on_device(i) as layer:
                if losses is not None:
                    variants[i] = states  # skipping layer i: its output is its input
                recorder.active = True
                states = [layer(h, *calls[b][i][0], **calls[b][i][1]) for b, h in enumerate(states)]
                recorder.active = False
                for skipped, vs in variants.items():
                    if skipped != i:
                        variants[skipped] = [layer(h, *calls[b][i][0], **calls[b][i][1]) for b, h in enumerate(vs)]
            advance(chunk.numel() / n_layers)
        recorder.active = True
        finals = [base.norm(h) for h in states]
        recorder.active = False
        if losses is not None:
            for ids, final in zip(batches, finals):
                losses.base = losses.base + nll_sum(final, ids, head, divisor)
                losses.tokens += ids.shape[0] * (ids.shape[1] - 1)
            for skipped, vs in variants.items():
                for ids, v in zip(batches, vs):
                    losses.skipped[skipped] = losses.skipped[skipped] + nll_sum(base.norm(v), ids, head, divisor)


class ResidentLayers:
    """Layers of an in-memory model, moved to the device one at a time (a no-op when already there)."""

    def __init__(self, layers: nn.ModuleList, device: torch.device):
        self.layers, self.device = layers, device

    @contextlib.contextmanager
    def on_device(self, i: int) -> Iterator[nn.Module]:
        layer = self.layers[i]
        home = next(layer.parameters()).device
        layer.to(self.device)
        try:
            yield layer
        finally:
            layer.to(home)


class CheckpointLayers:
    """Layers of a meta-device model, loaded from the checkpoint's safetensors one at a time.

    Each in-memory tensor is read under its own name when the checkpoint has it, else built from the
    on-disk tensors it is made of (GraniteMoe's renamed experts, Qwen3-MoE's per-expert projections)."""

    def __init__(self, folder: Path, layers: nn.ModuleList, shape: Shape, device: torch.device):
        self.reader = CheckpointReader(folder)
        self.layers, self.shape, self.device = layers, shape, device

    @contextlib.contextmanager
    def on_device(self, i: int) -> Iterator[nn.Module]:
        layer = self.layers[i]
        prefix = f"model.layers.{i}."
        stored = {k[len(prefix) :] for k in self.reader.keys() if k.startswith(prefix)}
        memory = self.shape.memory_layer_tensors()
        direct = {spec.name for spec in memory if spec.name in stored or not spec.parts}
        names = [prefix + n for spec in memory for n in ([spec.name] if spec.name in direct else self._parts(spec))]
        tensors = self.reader.read(names)
        read = lambda name: tensors[prefix + name]  # noqa: E731
        state = {s.name: read(s.name) if s.name in direct else assemble(self.shape, s, read) for s in memory}
        self.reader.fill(layer, state, self.device)
        try:
            yield layer
        finally:
            layer.to("meta")  # frees the weights; the module and its hooks stay
            _return_freed_memory()

    def _parts(self, spec) -> list[str]:
        return [name for part in spec.parts for name in self.shape.stored_names(part)]


def _return_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps the freed weights of one layer in its heap and
    fragmentation stops the next layer from reusing all of it, so without this the resident memory of a
    streamed pass creeps up by most of a layer per layer (measured: +220 MiB over 12 layers of a 100M
    model; flat with it). A no-op where there is no glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError, TypeError):
        return ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim
    return None


class CheckpointReader:
    """Tensors of a checkpoint folder by on-disk name, read lazily from its safetensors shards."""

    def __init__(self, folder: Path):
        from minitron.inputs import weights_index

        self.folder = Path(folder)
        self.files = {name: stored.file for name, stored in weights_index(self.folder).items()}

    def keys(self):
        return self.files.keys()

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        out, by_file = {}, {}
        for name in names:
            if name not in self.files:
                raise UserError(f"checkpoint has no tensor {name!r}", where=str(self.folder), fix="is the checkpoint complete?")
            by_file.setdefault(self.files[name], []).append(name)
        for file, file_names in by_file.items():
            with safe_open(str(file), framework="pt", device="cpu") as f:
                out.update({n: f.get_tensor(n) for n in file_names})
        return out

    def materialize(self, module: nn.Module, state: dict[str, str], device: torch.device) -> None:
        """Give a meta-device ``module`` real storage on ``device`` filled from the checkpoint;
        ``state`` maps the module's state-dict keys to on-disk names."""
        tensors = self.read(list(state.values()))
        self.fill(module, {k: tensors[v] for k, v in state.items()}, device)

    def fill(self, module: nn.Module, state: dict[str, torch.Tensor], device: torch.device) -> None:
        """Give a meta-device ``module`` real storage on ``device`` holding ``state`` (its state-dict keys)."""
        expected = set(module.state_dict())
        if set(state) != expected:
            missing = sorted(expected - set(state))
            raise UserError(
                f"checkpoint tensors do not match the model (missing {missing[:3]})", where=str(self.folder)
            )
        module.to_empty(device=device)
        module.load_state_dict(state)


def chunk_samples(shape: Shape, seq_len: int, batch_size: int, layer_loss: bool, device: torch.device, dtype, budget=None) -> int:
    """How many samples' hidden states to carry through the layers at once in the layer-by-layer pass:
    as many as fit in ``budget`` bytes (default: a quarter of the free memory of ``device``)."""
    budget = budget if budget is not None else free_memory(device) // 4
    per_sample = seq_len * shape.hidden * torch.empty((), dtype=dtype).element_size()
    per_sample *= 1 + (shape.layers if layer_loss else 0)
    fit = max(1, budget // per_sample)
    return max(batch_size, fit // batch_size * batch_size)


def free_memory(device: torch.device) -> int:
    """Bytes free on ``device`` (CUDA: the driver's count; CPU: the OS's available memory)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with contextlib.suppress(OSError, ValueError, StopIteration):
        # MemAvailable counts reclaimable page cache as free, unlike sysconf's free pages.
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 8 << 30


@contextlib.contextmanager
def globals_on(model: nn.Module, device: torch.device) -> Iterator[None]:
    """Embeddings, rotary embedding, final norm and output head on ``device`` for the layer-by-layer
    pass (they are small next to the layers), back where they were afterwards."""
    base = model.model
    modules = [base.embed_tokens, base.rotary_emb, base.norm, model.get_output_embeddings()]
    homes = [next(m.buffers(), next(m.parameters(), None)) for m in modules]
    for m in modules:
        m.to(device)
    try:
        yield
    finally:
        for m, t in zip(modules, homes):
            if t is not None:
                m.to(t.device)

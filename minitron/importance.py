"""Activation-based importance (Minitron, arXiv 2407.14679 §2.2): forward hooks, no gradients.

What is scored, from which activation (``B`` samples × ``S`` tokens per forward pass):

============== ==================================================================================
heads          per query head, the L2 norm of its slice of the ``o_proj`` input (its attention output)
kv_groups      per KV head, the L2 norm of the slices of all query heads that share it
neurons        per MLP neuron, the input of the down projection (per expert for MoE)
hidden         per embedding channel, the outputs of every RMSNorm, summed over all of them
expert_tokens  per MoE expert, how many tokens the router sent to it
expert_norm    per MoE expert, the L2 norm of its (routing-weighted) output
blocks         per layer, block importance 1 − cos(layer input, layer output), mean over tokens
layer_loss     per layer (optional), the rise of the LM loss when the layer is skipped
============== ==================================================================================

Each activation becomes a per-token magnitude, is aggregated over the sequence of each sample
(``seq_agg``) and then over samples (``batch_agg``), each one of mean / l2 / var; Minitron found batch
L2 + sequence mean best, the default. The batch aggregation streams (running sums, Chan's parallel
variance), so memory does not grow with the number of samples, and nothing leaves the device until the end.

Why not ModelOpt's hooks (``modelopt.torch.prune.importance_hooks``, read for this module): ``L2NormHook``
expects Megatron's ``[seq, batch, hidden]`` layout (on HF's ``[batch, seq, hidden]`` it would average
over the batch and take the L2 over the sequence, the reverse of the paper's best choice) and fixes the
aggregation; ``LayerNormContributionHook`` fixes it to a mean over all tokens;
``IndependentKvHeadContributionHook`` needs a Puzzle ``block_config`` and scores the o_proj *output*
per group; none can see inside transformers' fused MoE experts; and importing them pulls in omegaconf
and ModelOpt's distributed utilities. The hooks here keep their good idea (hook objects that accumulate
in the forward pass) with HF layouts and selectable aggregations.

Two ways to run the same computation, giving the same scores (tested):

* whole model: the model's own forward, one pass per batch, hooks accumulate;
* layer by layer (``offload``, or a checkpoint streamed from safetensors): the model's own forward runs
  once per batch with its decoder layers replaced by recorders, which capture the embeddings and the
  arguments each layer receives (rotary cos/sin, masks, including per-layer sliding-window masks), so
  every family's own code builds them; then one layer at a time is put on the device and applied to
  the carried hidden states of a chunk of samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minitron.errors import UserError
from minitron.families import Shape, family_of, logits_divisor

AGGREGATIONS = ("mean", "l2", "var")
FORMAT = "minitron-scores"
FORMAT_VERSION = 1


# --- the artifact ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Importance scores of one model: tensors keyed as in docs/CONTRACTS.md plus a JSON-able ``meta``."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @property
    def shape(self) -> Shape:
        """The teacher shape the scores were computed on."""
        return Shape(**self.meta["shape"])

    @property
    def digest(self) -> str:
        return _digest(self.tensors)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """One ``.safetensors`` file; ``meta`` (with the digest of the tensors) is its JSON header."""
        from safetensors.torch import save_file

        from minitron.artifacts import atomic_file

        meta = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "digest": self.digest}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        with atomic_file(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={"minitron": json.dumps(meta, sort_keys=True)})
        self.meta = meta
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, expect: Shape | None = None) -> "Scores":
        """Read a scores file; refuse a corrupt one, and one computed on a shape other than ``expect``."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise UserError("no such scores file", where=str(path), fix="run `minitron importance` first")
        fix = "recompute it with `minitron importance`"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = (f.metadata() or {}).get("minitron")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type, OSError or ValueError on damage
            raise UserError(f"not a readable scores file, corrupt? ({type(e).__name__})", where=str(path), fix=fix) from None
        try:
            meta = json.loads(header) if header else None
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError("not a minitron scores file (no minitron header)", where=str(path), fix=fix)
        if _digest(tensors) != meta.get("digest"):
            raise UserError("scores file is corrupt (digest mismatch)", where=str(path), fix=fix)
        scores = cls(tensors, meta)
        if expect is not None:
            _check_shape(scores.shape, expect, path)
        return scores


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_shape(found: Shape, expect: Shape, path: Path) -> None:
    if found == expect:
        return
    diffs = [f"{k} {a} ≠ {b}" for k, (a, b) in _pairs(found.to_dict(), expect.to_dict()) if a != b]
    raise UserError(
        f"scores were computed for a different model ({', '.join(diffs)})",
        where=str(path),
        fix="recompute the scores on this model with `minitron importance`",
    )


def _pairs(a: dict, b: dict):
    return ((k, (a.get(k), b.get(k))) for k in sorted(set(a) | set(b)))


# --- aggregation ----------------------------------------------------------------------------------------------


def reduce_seq(values: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, S, C]`` → ``[B, C]`` float32: aggregate each sample's per-token magnitudes ``|values|``
    over its sequence. ``vector_norm`` reduces in float32 without a float32 copy of the activations."""
    if how == "mean":
        return torch.linalg.vector_norm(values, ord=1, dim=1, dtype=torch.float32) / values.shape[1]
    if how == "l2":
        return torch.linalg.vector_norm(values, ord=2, dim=1, dtype=torch.float32)
    return values.float().abs().var(dim=1, correction=0)


def reduce_seq_rows(values: torch.Tensor, sample: torch.Tensor, samples: int, how: str) -> torch.Tensor:
    """Like :func:`reduce_seq` for rows that belong to samples unevenly (the tokens an expert was sent):
    ``values [n, C]``, ``sample [n]`` → ``[samples, C]``; a sample with no rows gets 0."""
    values = values.float().abs()
    zeros = values.new_zeros(samples, values.shape[1])
    if how == "l2":
        return zeros.index_add_(0, sample, values.square()).sqrt()
    count = torch.bincount(sample, minlength=samples).clamp(min=1).unsqueeze(1).to(values.dtype)
    mean = zeros.index_add(0, sample, values) / count
    if how == "mean":
        return mean
    return (zeros.index_add(0, sample, values.square()) / count - mean.square()).clamp(min=0)


class BatchAgg:
    """Streaming aggregate over samples of per-sample score vectors ``[B, ...]``: constant memory."""

    def __init__(self, how: str):
        self.how, self.n = how, 0
        self._a: torch.Tensor | None = None  # sum (mean), sum of squares (l2), running mean (var)
        self._m2: torch.Tensor | None = None  # sum of squared deviations (var)

    def add(self, x: torch.Tensor) -> None:
        b = x.shape[0]
        if self.how == "mean":
            s = x.sum(0)
        elif self.how == "l2":
            s = x.square().sum(0)
        else:
            # Chan et al.'s parallel update: numerically stable in float32, unlike E[x²] − E[x]².
            mean_b = x.mean(0)
            m2_b = (x - mean_b).square().sum(0)
            if self._a is None:
                self._a, self._m2 = mean_b, m2_b
            else:
                n = self.n + b
                delta = mean_b - self._a
                self._a = self._a + delta * (b / n)
                self._m2 = self._m2 + m2_b + delta.square() * (self.n * b / n)
            self.n += b
            return
        self._a = s if self._a is None else self._a + s
        self.n += b

    def result(self) -> torch.Tensor:
        if self._a is None:
            raise RuntimeError("no activations were recorded")
        if self.how == "mean":
            return self._a / self.n
        if self.how == "l2":
            return self._a.sqrt()
        return self._m2 / self.n


# --- hooks ----------------------------------------------------------------------------------------------------


class Recorder:
    """All hooks of one model and their accumulators; ``active`` switches recording off for passes that
    must not count (the probe pass, layer-skipped passes)."""

    def __init__(self, model: nn.Module, shape: Shape, batch_agg: str = "l2", seq_agg: str = "mean"):
        self.shape, self.batch_agg, self.seq_agg = shape, batch_agg, seq_agg
        self.active = True
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        family = shape.family
        base = model.model
        agg = lambda: BatchAgg(batch_agg)  # noqa: E731
        layers = len(base.layers)
        self.norms = [agg() for _ in range(layers * len(family.layer_norms) + 1)]
        self.heads = [agg() for _ in range(layers)]
        self.kv_groups = [agg() for _ in range(layers)]
        self.neurons = [agg() for _ in range(layers)]
        self.expert_norm = [agg() for _ in range(layers)] if family.is_moe else []
        self.expert_tokens: list[torch.Tensor | int] = [0] * layers if family.is_moe else []
        self.cos_sum: list[torch.Tensor | float] = [0.0] * layers
        self.cos_count = [0] * layers
        self._moe_tokens: tuple[int, int] = (0, 0)

        for i, layer in enumerate(base.layers):
            for j, path in enumerate(family.layer_norms):
                self._hook(layer.get_submodule(path), self._norm_hook(self.norms[i * len(family.layer_norms) + j]))
            self._pre_hook(layer.get_submodule(family.attn_out), self._heads_hook(i))
            if family.is_moe:
                moe = layer.get_submodule(family.moe)
                self._pre_hook(moe, self._moe_shape_hook)
                self._instrument_experts(moe.experts, i)
            else:
                self._pre_hook(layer.get_submodule(family.mlp_down), self._neurons_hook(i))
            self._handles.append(layer.register_forward_hook(self._block_hook(i), with_kwargs=True))
        self._hook(base.norm, self._norm_hook(self.norms[-1]))

    def _hook(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_hook(fn))

    def _pre_hook(self, module: nn.Module, fn) -> None:
        self._handles.append(module.register_forward_pre_hook(fn))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        for experts in self._patched:
            del experts.forward  # back to the class's forward
        self._handles, self._patched = [], []

    # Hook factories: each returns a closure bound to its accumulator; they reduce on the device at once,
    # so no activation outlives the hook and nothing synchronises with the host.

    def _norm_hook(self, acc: BatchAgg):
        def hook(module, args, output):
            if self.active:
                acc.add(reduce_seq(output, self.seq_agg))

        return hook

    def _heads_hook(self, i: int):
        heads, kv_heads, head_dim = self.shape.heads, self.shape.kv_heads, self.shape.head_dim

        def hook(module, args):
            if not self.active:
                return
            x = args[0]  # [B, S, heads × head_dim], heads in order, each KV group's heads adjacent
            b, s, _ = x.shape
            per_head = torch.linalg.vector_norm(x.view(b, s, heads, head_dim), dim=-1, dtype=torch.float32)
            per_group = per_head.square().view(b, s, kv_heads, heads // kv_heads).sum(-1).sqrt()
            self.heads[i].add(reduce_seq(per_head, self.seq_agg))
            self.kv_groups[i].add(reduce_seq(per_group, self.seq_agg))

        return hook

    def _neurons_hook(self, i: int):
        def hook(module, args):
            if self.active:
                self.neurons[i].add(reduce_seq(args[0], self.seq_agg))

        return hook

    def _block_hook(self, i: int):
        def hook(module, args, kwargs, output):
            if not self.active:
                return
            x = args[0] if args else kwargs["hidden_states"]
            y = output[0] if isinstance(output, tuple) else output
            cos = F.cosine_similarity(x.float(), y.float(), dim=-1)
            self.cos_sum[i] = self.cos_sum[i] + cos.sum(dtype=torch.float64)
            self.cos_count[i] += cos.numel()

        return hook

    def _moe_shape_hook(self, module, args):
        b, s = args[0].shape[:2]
        self._moe_tokens = (b, s)

    def _instrument_experts(self, experts: nn.Module, i: int) -> None:
        # transformers runs the fused experts through `F.linear(h, down_proj[e])` (or grouped/batched
        # matmuls), so there is no module whose input is an expert's neurons to hook. The instance's
        # forward is replaced, for the duration of scoring, by transformers' eager expert loop written out
        # here with one addition: each expert's down-projection input is handed to the accumulators.
        # Same operations in the same order, so the output is bit-identical to the eager implementation
        # (tested) and equal to the grouped_mm default up to float rounding; `remove()` restores it.
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise NotImplementedError("importance hooks support gate‖up experts without bias, not transposed")
        n_experts, ffn = experts.num_experts, experts.intermediate_dim

        def forward(hidden_states, top_k_index, top_k_weights):
            final = torch.zeros_like(hidden_states)
            with torch.no_grad():
                expert_mask = F.one_hot(top_k_index, num_classes=n_experts).permute(2, 1, 0)
                hit = torch.greater(expert_mask.sum(dim=(-1, -2)), 0).nonzero()
            record = self.active
            if record:
                b, s = self._moe_tokens
                neurons = hidden_states.new_zeros(b, n_experts, ffn, dtype=torch.float32)
                out_norm = hidden_states.new_zeros(b, n_experts, dtype=torch.float32)
            for expert in hit:
                e = expert[0]
                top_k_pos, token_idx = torch.where(expert_mask[e])
                gate, up = F.linear(hidden_states[token_idx], experts.gate_up_proj[e]).chunk(2, dim=-1)
                h = experts.act_fn(gate) * up
                y = F.linear(h, experts.down_proj[e]) * top_k_weights[token_idx, top_k_pos, None]
                final.index_add_(0, token_idx, y.to(final.dtype))
                if record:
                    sample = token_idx // s
                    neurons[:, e] = reduce_seq_rows(h, sample, b, self.seq_agg)
                    norms = torch.linalg.vector_norm(y, dim=-1, keepdim=True, dtype=torch.float32)
                    out_norm[:, e] = reduce_seq_rows(norms, sample, b, self.seq_agg)[:, 0]
            if record:
                self.neurons[i].add(neurons)
                self.expert_norm[i].add(out_norm)
                counts = torch.bincount(top_k_index.flatten(), minlength=n_experts)
                self.expert_tokens[i] = self.expert_tokens[i] + counts
            return final

        experts.forward = forward
        self._patched.append(experts)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The scores, keyed as in docs/CONTRACTS.md, on the CPU."""
        out: dict[str, torch.Tensor] = {"hidden": torch.stack([a.result() for a in self.norms]).sum(0)}
        for i in range(len(self.heads)):
            out[f"heads.{i}"] = self.heads[i].result()
            out[f"kv_groups.{i}"] = self.kv_groups[i].result()
            out[f"neurons.{i}"] = self.neurons[i].result()
            if self.expert_norm:
                out[f"expert_tokens.{i}"] = torch.as_tensor(self.expert_tokens[i], dtype=torch.int64)
                out[f"expert_norm.{i}"] = self.expert_norm[i].result()
        out["blocks"] = torch.stack(
            [1 - torch.as_tensor(c, dtype=torch.float64) / n for c, n in zip(self.cos_sum, self.cos_count)]
        ).float()
        return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype) for k, v in out.items()}


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


def _whole_pass(model, blocks, batch_size, recorder, losses, device, advance) -> None:
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


def _sweep_pass(model, blocks, batch_size, recorder, losses, device, layer_source, chunk_samples, advance) -> None:
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
        probed = [_probe(base, ids) for ids in batches]
        states = [hidden for hidden, _ in probed]
        calls = [c for _, c in probed]
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


class _ResidentLayers:
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


class _CheckpointLayers:
    """Layers of a meta-device model, loaded from the checkpoint's safetensors one at a time."""

    def __init__(self, folder: Path, layers: nn.ModuleList, memory_names: dict[str, str], device: torch.device):
        self.reader = CheckpointReader(folder)
        self.layers, self.memory_names, self.device = layers, memory_names, device

    @contextlib.contextmanager
    def on_device(self, i: int) -> Iterator[nn.Module]:
        layer = self.layers[i]
        prefix = f"model.layers.{i}."
        state = {
            self.memory_names.get(k[len(prefix) :], k[len(prefix) :]): k for k in self.reader.keys() if k.startswith(prefix)
        }
        self.reader.materialize(layer, state, self.device)
        try:
            yield layer
        finally:
            layer.to("meta")  # frees the weights; the module and its hooks stay


class CheckpointReader:
    """Tensors of a checkpoint folder by on-disk name, read lazily from its safetensors shards."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            from safetensors import safe_open

            shards = sorted(self.folder.glob("*.safetensors"))
            if not shards:
                raise UserError("folder has no .safetensors weights", where=str(self.folder), fix="pass a checkpoint folder")
            self.files = {}
            for shard in shards:
                with safe_open(str(shard), framework="pt") as f:
                    self.files.update({k: shard for k in f.keys()})

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
        expected = set(module.state_dict())
        if set(state) != expected:
            missing = sorted(expected - set(state))
            raise UserError(
                f"checkpoint tensors do not match the model (missing {missing[:3]})", where=str(self.folder)
            )
        tensors = self.read(list(state.values()))
        module.to_empty(device=device)
        module.load_state_dict({k: tensors[v] for k, v in state.items()})


# --- entry points ---------------------------------------------------------------------------------------------


def _check_aggregations(batch_agg: str, seq_agg: str) -> None:
    for flag, value in (("--batch-agg", batch_agg), ("--seq-agg", seq_agg)):
        if value not in AGGREGATIONS:
            raise UserError(f"unknown aggregation {value!r}", where=flag, fix=f"use one of {', '.join(AGGREGATIONS)}")


def _settings(blocks, batch_size, batch_agg, seq_agg, layer_loss, mode, device) -> dict[str, Any]:
    return {
        "samples": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "batch_size": batch_size,
        "batch_agg": batch_agg,
        "seq_agg": seq_agg,
        "layer_loss": layer_loss,
        "mode": mode,
        "device": str(device),
    }


def _scores(recorder: Recorder, losses: LossSums | None, shape: Shape, settings: dict, meta: dict | None) -> Scores:
    from minitron.artifacts import versions

    tensors = recorder.tensors()
    if losses is not None:
        tensors["layer_loss"] = losses.rise()
    return Scores(tensors, {**(meta or {}), "settings": settings, "shape": shape.to_dict(), "versions": versions()})


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
    with contextlib.suppress(ValueError, OSError, AttributeError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return 8 << 30


def compute_scores(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 1,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    layer_loss: bool = False,
    offload: bool = False,
    device: str | torch.device | None = None,
    chunk: int | None = None,
    show_progress: bool = True,
    meta: dict | None = None,
) -> Scores:
    """Score an in-memory transformers causal LM on calibration ``blocks [samples, seq_len]``.

    ``offload``: keep the model where it is (e.g. CPU) and move one decoder layer at a time to ``device``
    (default: where the model is), carrying ``chunk`` samples' hidden states (default: what fits).
    """
    _check_aggregations(batch_agg, seq_agg)
    shape = Shape.from_config(model.config)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.eval()
    recorder = Recorder(model, shape, batch_agg, seq_agg)
    losses = LossSums(shape.layers) if layer_loss else None
    try:
        with torch.no_grad(), _progress(blocks.numel(), show_progress) as advance:
            if not offload:
                _whole_pass(model, blocks, batch_size, recorder, losses, home, advance)
            else:
                n = chunk or chunk_samples(shape, blocks.shape[1], batch_size, layer_loss, device, model.dtype)
                with _globals_on(model, device):
                    source = _ResidentLayers(model.model.layers, device)
                    _sweep_pass(model, blocks, batch_size, recorder, losses, device, source, n, advance)
    finally:
        recorder.remove()
    mode = "layer-by-layer" if offload else "whole-model"
    return _scores(recorder, losses, shape, _settings(blocks, batch_size, batch_agg, seq_agg, layer_loss, mode, device), meta)


@contextlib.contextmanager
def _globals_on(model: nn.Module, device: torch.device) -> Iterator[None]:
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


def score_checkpoint(
    folder: str | Path,
    blocks: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    layer_loss: bool = False,
    chunk: int | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    meta: dict | None = None,
) -> Scores:
    """Score a checkpoint folder layer by layer, streaming each layer's weights from its safetensors.

    The model is built on the meta device; only the embeddings, the final norm (and the output head for
    ``layer_loss``) and one decoder layer at a time get real memory, so an 8B teacher is scored on a
    machine that could not hold it.
    """
    from minitron.families import load_config, meta_model

    _check_aggregations(batch_agg, seq_agg)
    folder = Path(folder)
    config = load_config(folder, trust_remote_code=trust_remote_code)
    shape, family, device = Shape.from_config(config), family_of(config), torch.device(device)
    model = meta_model(config).to(dtype).eval()
    base = model.model
    reader = CheckpointReader(folder)
    reader.materialize(base.embed_tokens, {"weight": "model.embed_tokens.weight"}, device)
    reader.materialize(base.norm, {"weight": "model.norm.weight"}, device)
    # Rotary frequencies are non-persistent buffers (not in the checkpoint): build the module anew.
    with torch.device(device):
        base.rotary_emb = type(base.rotary_emb)(config=model.config)
    if layer_loss:
        if shape.tied:
            model.get_output_embeddings().weight = base.embed_tokens.weight
        else:
            reader.materialize(model.get_output_embeddings(), {"weight": "lm_head.weight"}, device)
    recorder = Recorder(model, shape, batch_agg, seq_agg)
    losses = LossSums(shape.layers) if layer_loss else None
    n = chunk or chunk_samples(shape, blocks.shape[1], batch_size, layer_loss, device, dtype)
    source = _CheckpointLayers(folder, base.layers, family.memory_names, device)
    try:
        with torch.no_grad(), _progress(blocks.numel(), show_progress) as advance:
            _sweep_pass(model, blocks, batch_size, recorder, losses, device, source, n, advance)
    finally:
        recorder.remove()
    settings = _settings(blocks, batch_size, batch_agg, seq_agg, layer_loss, "streamed", device)
    return _scores(recorder, losses, shape, settings, meta)


@contextlib.contextmanager
def _progress(total_tokens: int, show: bool) -> Iterator[Any]:
    if not show:
        yield lambda n: None
        return
    from rich.progress import ProgressColumn
    from rich.text import Text

    from minitron.report_console import human, progress

    class TokensPerSecond(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{human(speed)} tok/s" if speed else "… tok/s", style="cyan")

    with progress(TokensPerSecond()) as bar:
        task = bar.add_task("importance", total=total_tokens)
        yield lambda n: bar.advance(task, n)


# --- the CLI verb's work ----------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}", where="--device", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", where="--device", fix="use --device cpu or auto")
    return device


def resolve_dtype(name: str, config: Any, device: torch.device) -> torch.dtype:
    if name == "auto":
        # The checkpoint's own half precision on a GPU; float32 on the CPU, where half-precision matmuls
        # are slow or unsupported on many machines.
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        saved = _DTYPES.get(str(saved).removeprefix("torch."), None) if saved is not None else None
        return saved if device.type == "cuda" and saved is not None else torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}", where="--dtype", fix=f"use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def fits(shape: Shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the whole model's weights fit comfortably (with room for activations) on ``device``."""
    weights = shape.counts()["total"] * torch.empty((), dtype=dtype).element_size()
    return weights * 1.3 < free_memory(device)


def run(
    model: str,
    calib: str,
    out: str | Path,
    *,
    samples: int = 1024,
    seq_len: int = 4096,
    batch_size: int = 1,
    seed: int = 0,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    layer_loss: bool = False,
    offload: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    split: str = "train",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    show_progress: bool = True,
) -> tuple[Scores, dict[str, Any]]:
    """``minitron importance``: calibration tokens → scores file. Every check that can fail on the user's
    input runs before the model is loaded; the file appears only when complete."""
    from minitron.artifacts import check_output_dir
    from minitron.data import token_blocks
    from minitron.families import has_weights, is_local, load_config

    check_output_dir(out, overwrite)
    _check_aggregations(batch_agg, seq_agg)
    if batch_size < 1:
        raise UserError("must be ≥ 1", where="--batch-size")
    config = load_config(model, trust_remote_code=trust_remote_code)
    shape = Shape.from_config(config)
    local = is_local(model)
    if local and not has_weights(model):
        raise UserError("folder has no .safetensors weights", where=str(model), fix="importance needs a checkpoint with weights")
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    tokenizer = _load_tokenizer(model, trust_remote_code)
    blocks = token_blocks(tokenizer, calib, seq_len=seq_len, samples=samples, seed=seed, split=split)

    meta = {
        "model": str(model),
        "data": {"source": str(calib), "split": split, "samples": samples, "seq_len": seq_len, "seed": seed},
    }
    streamed = offload or not fits(shape, torch_dtype, torch_device)
    options = dict(batch_size=batch_size, batch_agg=batch_agg, seq_agg=seq_agg, layer_loss=layer_loss)
    start = time.perf_counter()
    if streamed:
        folder = Path(model) if local else _download(model)
        scores = score_checkpoint(
            folder, blocks, device=torch_device, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            show_progress=show_progress, meta=meta, **options,
        )  # fmt: skip
    else:
        loaded = _load_model(model, torch_dtype, trust_remote_code).to(torch_device)
        scores = compute_scores(loaded, blocks, show_progress=show_progress, meta=meta, **options)
    seconds = time.perf_counter() - start
    scores.meta["seconds"] = round(seconds, 3)
    scores.save(out, overwrite=overwrite)
    info = {
        "out": str(out),
        "mode": scores.meta["settings"]["mode"],
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "tokens": int(blocks.numel()),
        "seconds": seconds,
        "digest": scores.meta["digest"],
    }
    return scores, info


def _load_tokenizer(model: str, trust_remote_code: bool):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise UserError(
            f"cannot load its tokenizer ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
            where=str(model),
            fix="the checkpoint needs its tokenizer files (tokenizer.json / tokenizer_config.json)",
        ) from None


def _load_model(model: str, dtype: torch.dtype, trust_remote_code: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(model), dtype=dtype, trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(f"cannot load the model ({str(e).splitlines()[0]})", where=str(model)) from None


def _download(repo: str) -> Path:
    """A hub model's files in the local cache, for streaming its safetensors layer by layer."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # hub errors come in many types: network, auth, missing repo
        raise UserError(f"cannot download ({type(e).__name__})", where=repo, fix="check the hub id, network, HF_TOKEN") from None


def summary_table(scores: Scores, info: dict[str, Any]):
    """Per layer: block importance, layer-loss rise, and the spread of head and neuron scores."""
    from rich.table import Table

    from minitron.report_console import human

    t = scores.tensors
    title = (
        f"importance → {info['out']}  ({info['mode']}, {info['device']}, {info['dtype']}, "
        f"{human(info['tokens'])} tokens in {info['seconds']:.1f}s, digest {info['digest'][:12]})"
    )
    table = Table(title=title, title_justify="left")
    for name in ("layer", "block importance", "layer-loss rise", "heads min…max", "neurons min…max"):
        table.add_column(name, justify="right")
    for i in range(scores.shape.layers):
        heads, neurons = t[f"heads.{i}"], t[f"neurons.{i}"]
        table.add_row(
            str(i),
            f"{t['blocks'][i]:.4g}",
            f"{t['layer_loss'][i]:+.4g}" if "layer_loss" in t else "–",
            f"{heads.min():.3g} … {heads.max():.3g}",
            f"{neurons.min():.3g} … {neurons.max():.3g}",
        )
    return table

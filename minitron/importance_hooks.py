"""Forward hooks that turn activations into importance scores as the forward pass runs.

Each activation becomes a per-token magnitude, is aggregated over the sequence of each sample
(``seq_agg``) and then over samples (``batch_agg``), each one of mean / l2 / var; Minitron (2407.14679
§2.2) found batch L2 + sequence mean best, the default. The batch aggregation streams (running sums,
Chan's parallel variance), so memory does not grow with the number of samples, and the hooks reduce on
the device at once: no activation outlives its hook and nothing waits for the host.

Why not ModelOpt's hooks (``modelopt.torch.prune.importance_hooks``, read for this module): ``L2NormHook``
expects Megatron's ``[seq, batch, hidden]`` layout (on HF's ``[batch, seq, hidden]`` it would average
over the batch and take the L2 over the sequence, the reverse of the paper's best choice) and fixes the
aggregation; ``LayerNormContributionHook`` fixes it to a mean over all tokens;
``IndependentKvHeadContributionHook`` needs a Puzzle ``block_config`` and scores the o_proj *output*
per group; none can see inside transformers' fused MoE experts; and importing them pulls in omegaconf
and ModelOpt's distributed utilities. The hooks here keep their good idea (hook objects that accumulate
in the forward pass) with HF layouts and selectable aggregations.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minitron.families import Shape
from minitron.plan import norm_count

AGGREGATIONS = ("mean", "l2", "var")
# How an embedding channel's scores at the model's norms combine into one: Minitron's sum over every norm, or
# the channel's largest share of any one norm's total (a channel that a single layer leans on is kept).
NORM_AGGREGATIONS = ("sum", "max-share")


# --- aggregation ----------------------------------------------------------------------------------------------


def reduce_seq(values: torch.Tensor, how: str) -> torch.Tensor:
    """``[B, S, C]`` → ``[B, C]`` float32: aggregate each sample's per-token magnitudes ``|values|``
    over its sequence. ``vector_norm`` reduces in float32 without a float32 copy of the activations."""
    if how == "mean":
        return torch.linalg.vector_norm(values, ord=1, dim=1, dtype=torch.float32) / values.shape[1]
    if how == "l2":
        return torch.linalg.vector_norm(values, ord=2, dim=1, dtype=torch.float32)
    return values.float().abs().var(dim=1, correction=0)


def reduce_seq_rows(
    values: torch.Tensor, sample: torch.Tensor, samples: int, how: str, length: int | None = None
) -> torch.Tensor:
    """Like :func:`reduce_seq` for rows that belong to samples unevenly (the tokens an expert was sent):
    ``values [n, C]``, ``sample [n]`` → ``[samples, C]``; a sample with no rows gets 0.

    ``length=None``: aggregate over each sample's rows alone (what an expert's neurons do when it runs).
    ``length=S``: the rows are the non-zero tokens of a length-``S`` sequence that is zero elsewhere (an
    expert's output: it adds nothing to a token it was not sent), so ``mean`` divides by ``S`` and an expert
    sent one token weighs one ``S``-th of an expert sent every token with the same output."""
    values = values.float().abs()
    zeros = values.new_zeros(samples, values.shape[1])
    if how == "l2":
        return zeros.index_add_(0, sample, values.square()).sqrt()
    if length is not None:
        count = values.new_full((samples, 1), float(length))
    else:
        count = torch.bincount(sample, minlength=samples).clamp(min=1).unsqueeze(1).to(values.dtype)
    mean = zeros.index_add(0, sample, values) / count
    if how == "mean":
        return mean
    return (zeros.index_add(0, sample, values.square()) / count - mean.square()).clamp(min=0)


def combine_norms(per_norm: torch.Tensor, how: str) -> torch.Tensor:
    """``[norms, hidden]`` → ``[hidden]``: each embedding channel's scores at every norm, combined.

    ``sum``: Minitron's (2407.14679 §2.2), the channel's scores added over the norms. ``max-share``: the
    channel's largest share of one norm's total, ``max over norms of score / that norm's sum``. A sum lets the
    norms whose outputs are largest decide; the shares weigh every norm alike, and the maximum keeps a channel
    that one layer relies on even where the others barely read it (``benchmarks/results/peers_prune_*.md``
    measure both)."""
    if how == "sum":
        return per_norm.sum(0)
    totals = per_norm.sum(1, keepdim=True)
    return (per_norm / totals.clamp(min=torch.finfo(per_norm.dtype).tiny)).amax(0)


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

    def __init__(
        self, model: nn.Module, shape: Shape, batch_agg: str = "l2", seq_agg: str = "mean", norm_agg: str = "sum"
    ):
        self.shape, self.batch_agg, self.seq_agg, self.norm_agg = shape, batch_agg, seq_agg, norm_agg
        self.active = True
        self._handles: list[Any] = []
        self._patched: list[nn.Module] = []
        family = shape.family
        base = model.model
        agg = lambda: BatchAgg(batch_agg)  # noqa: E731
        layers = len(base.layers)
        self.norms = [agg() for _ in range(norm_count(shape))]  # each layer's, then the final norm
        # Each norm's input, per channel: its mean square over every calibration token (how the pruner
        # rescales the norms that remain, see `minitron.plan.norm_scales`), whatever the aggregations.
        self.norm_energy = [BatchAgg("mean") for _ in self.norms]
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
                k = i * len(family.layer_norms) + j
                self._hook(layer.get_submodule(path), self._norm_hook(self.norms[k], self.norm_energy[k]))
            self._pre_hook(layer.get_submodule(family.attn_out), self._heads_hook(i))
            if family.is_moe:
                moe = layer.get_submodule(family.moe)
                self._pre_hook(moe, self._moe_shape_hook)
                self._instrument_experts(moe.experts, i)
            else:
                self._pre_hook(layer.get_submodule(family.mlp_down), self._neurons_hook(i))
            self._handles.append(layer.register_forward_hook(self._block_hook(i), with_kwargs=True))
        self._hook(base.norm, self._norm_hook(self.norms[-1], self.norm_energy[-1]))

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

    def _norm_hook(self, acc: BatchAgg, energy: BatchAgg):
        def hook(module, args, output):
            if self.active:
                acc.add(reduce_seq(output, self.seq_agg))
                x = args[0]
                energy.add(torch.linalg.vector_norm(x, ord=2, dim=1, dtype=torch.float32).square() / x.shape[1])

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
                    out_norm[:, e] = reduce_seq_rows(norms, sample, b, self.seq_agg, length=s)[:, 0]
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
        out: dict[str, torch.Tensor] = {
            "hidden": combine_norms(torch.stack([a.result() for a in self.norms]), self.norm_agg),
            "norm_energy": torch.stack([a.result() for a in self.norm_energy]),
        }
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

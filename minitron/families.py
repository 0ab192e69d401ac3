"""Every difference between model families, in one table.

A family is described by the tensors of one checkpoint *as they are named on disk* (what
``save_pretrained`` writes), and for each tensor which architectural axis each dimension runs along.
The pruner slices tensors by axis, the parameter counter multiplies axis sizes, and the importance
hooks find modules by their in-memory names: none of them knows a family by name.

Adding a family means adding one :class:`Family` entry to :data:`FAMILIES`.

Axes:

============ ======================================================================
``vocab``    token rows of the embedding and the output head (never pruned)
``hidden``   embedding channels (the residual stream): ``hidden_size``
``q``        query channels, ``num_attention_heads × head_dim``, grouped by head
``kv``       key/value channels, ``num_key_value_heads × head_dim``, grouped by head
``head_dim`` the channels of one head (Qwen3's per-head q/k RMSNorms; never pruned, since pruning removes
             whole heads and keeps ``head_dim``)
``ffn``      MLP neurons (per expert for MoE): ``intermediate_size``
``ffn2``     a fused gate‖up projection: two ``ffn`` blocks stacked (GraniteMoe; Qwen3-MoE in memory)
``experts``  MoE experts: ``num_local_experts`` (``num_experts`` for Qwen3-MoE)
============ ======================================================================

On disk and in memory. transformers 5 loads MoE experts into fused 3-D parameters. GraniteMoe's checkpoints
already hold them fused under other names (a rename). Qwen3-MoE checkpoints hold one tensor per expert and
projection, ``mlp.experts.{e}.gate_proj.weight`` and so on (the hub's files, and what ``save_pretrained`` of
transformers 5.24 writes back), which loading stacks over experts and concatenates gate‖up. Such tensors
have ``{e}`` in their table name: their ``experts`` axis runs across files, not inside one. A family's
in-memory tensors that differ from its on-disk ones are listed in ``Family.memory``, each with the on-disk
``parts`` it is built from. transformers also loads a checkpoint saved in the in-memory layout, so the
streamed pruner accepts either layout and writes the student in the layout it read.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from minitron.errors import UserError

AXES = ("vocab", "hidden", "q", "kv", "head_dim", "ffn", "ffn2", "experts")


@dataclass(frozen=True)
class Tensor:
    """One tensor of a decoder layer (or of the model, for globals), by its on-disk name suffix.

    ``when`` names a boolean config field that must be true for the tensor to exist (biases). A name with
    ``{e}`` is stored once per expert (``axes[0]`` is ``experts``, across the files). ``parts``: for an
    in-memory tensor that loading builds from other on-disk tensors, their names, stacked over experts
    when they hold ``{e}`` and concatenated along their first dimension.
    """

    name: str
    axes: tuple[str, ...]
    when: str | None = None
    parts: tuple[str, ...] = ()

    @property
    def per_expert(self) -> bool:
        return "{e}" in self.name


_ATTENTION = (
    Tensor("self_attn.q_proj.weight", ("q", "hidden")),
    Tensor("self_attn.k_proj.weight", ("kv", "hidden")),
    Tensor("self_attn.v_proj.weight", ("kv", "hidden")),
    Tensor("self_attn.o_proj.weight", ("hidden", "q")),
    Tensor("self_attn.q_proj.bias", ("q",), when="attention_bias"),
    Tensor("self_attn.k_proj.bias", ("kv",), when="attention_bias"),
    Tensor("self_attn.v_proj.bias", ("kv",), when="attention_bias"),
    Tensor("self_attn.o_proj.bias", ("hidden",), when="attention_bias"),
)
# Qwen2 always has q/k/v biases and never an output bias; its config has no switch for them.
_QWEN2_ATTENTION = tuple(
    Tensor(t.name, t.axes) for t in _ATTENTION if t.when is None or not t.name.startswith("self_attn.o_proj")
)
# Qwen3 normalises each query and key head over its head_dim channels (weights shared by all heads).
_QWEN3_ATTENTION = _ATTENTION + (
    Tensor("self_attn.q_norm.weight", ("head_dim",)),
    Tensor("self_attn.k_norm.weight", ("head_dim",)),
)
_NORMS = (
    Tensor("input_layernorm.weight", ("hidden",)),
    Tensor("post_attention_layernorm.weight", ("hidden",)),
)
# Nemotron's LayerNorm1P has a bias too (and scales by 1 + weight; slicing does not care).
_NORMS_WITH_BIAS = _NORMS + (
    Tensor("input_layernorm.bias", ("hidden",)),
    Tensor("post_attention_layernorm.bias", ("hidden",)),
)
_DENSE_MLP = (
    Tensor("mlp.gate_proj.weight", ("ffn", "hidden")),
    Tensor("mlp.up_proj.weight", ("ffn", "hidden")),
    Tensor("mlp.down_proj.weight", ("hidden", "ffn")),
    Tensor("mlp.gate_proj.bias", ("ffn",), when="mlp_bias"),
    Tensor("mlp.up_proj.bias", ("ffn",), when="mlp_bias"),
    Tensor("mlp.down_proj.bias", ("hidden",), when="mlp_bias"),
)
# Nemotron: down(relu²(up(x))), no gate.
_UNGATED_MLP = tuple(t for t in _DENSE_MLP if "gate_proj" not in t.name)
_GRANITEMOE_MLP = (
    Tensor("block_sparse_moe.router.layer.weight", ("experts", "hidden")),
    Tensor("block_sparse_moe.input_linear.weight", ("experts", "ffn2", "hidden")),
    Tensor("block_sparse_moe.output_linear.weight", ("experts", "hidden", "ffn")),
)
_GRANITEMOE_MEMORY = (
    Tensor("block_sparse_moe.router.weight", ("experts", "hidden"), parts=("block_sparse_moe.router.layer.weight",)),
    Tensor("block_sparse_moe.experts.gate_up_proj", ("experts", "ffn2", "hidden"),
           parts=("block_sparse_moe.input_linear.weight",)),
    Tensor("block_sparse_moe.experts.down_proj", ("experts", "hidden", "ffn"),
           parts=("block_sparse_moe.output_linear.weight",)),
)  # fmt: skip
_QWEN3_MOE_MLP = (
    Tensor("mlp.gate.weight", ("experts", "hidden")),
    Tensor("mlp.experts.{e}.gate_proj.weight", ("experts", "ffn", "hidden")),
    Tensor("mlp.experts.{e}.up_proj.weight", ("experts", "ffn", "hidden")),
    Tensor("mlp.experts.{e}.down_proj.weight", ("experts", "hidden", "ffn")),
)
_QWEN3_MOE_MEMORY = (
    Tensor("mlp.experts.gate_up_proj", ("experts", "ffn2", "hidden"),
           parts=("mlp.experts.{e}.gate_proj.weight", "mlp.experts.{e}.up_proj.weight")),
    Tensor("mlp.experts.down_proj", ("experts", "hidden", "ffn"), parts=("mlp.experts.{e}.down_proj.weight",)),
)  # fmt: skip
_GLOBALS = (
    Tensor("model.embed_tokens.weight", ("vocab", "hidden")),
    Tensor("model.norm.weight", ("hidden",)),
)
LM_HEAD = Tensor("lm_head.weight", ("vocab", "hidden"))


@dataclass(frozen=True)
class Family:
    """What minitron needs to know about one ``config.model_type``.

    Attributes:
        model_type: the key in ``config.json``.
        layer_tensors: tensors of decoder layer ``i``, named ``model.layers.{i}.<name>`` on disk.
        mlp_down: in-memory path (inside a decoder layer) of the module whose *input* is the MLP
            neurons, for dense families; ``None`` for MoE.
        moe: in-memory path of the MoE block (its ``experts`` inside it), or ``None``.
        router: in-memory path (inside a decoder layer) of the MoE router, whose weight is ``[E, D]``.
        memory: in-memory tensors of a decoder layer that differ from the on-disk ones, with the on-disk
            ``parts`` that transformers builds each from when loading.
        global_tensors: tensors outside the decoder layers (the output head apart).
        multipliers: config fields that scale activations (Granite's muP); kept as they are when pruning.
        attn_out: in-memory path (inside a decoder layer) of the attention output projection, whose
            input is the concatenated per-head attention outputs (importance of heads).
        layer_norms: in-memory paths of the norms inside a decoder layer over the embedding channels
            (importance of embedding channels, with the final ``model.norm``).
        rms_norms: the norms over the embedding channels are RMSNorms (``w · x / rms(x)``), which the pruner
            rescales when it removes embedding channels (:func:`minitron.plan.norm_scales`). Nemotron's
            LayerNorm1P also subtracts the mean and scales by ``1 + w``: it is cut and not rescaled.
        hidden_multiple_of_heads: the transformers config refuses a hidden size that is not a multiple of
            the number of query heads, even with an explicit ``head_dim`` (``LlamaConfig`` in transformers 5).
        ffn_key: the config field of the (expert) MLP width.
        experts_keys: the config fields of the expert count, aliases (transformers 5.24 writes Qwen3-MoE's
            ``num_experts`` of the hub's configs back as ``num_local_experts``).
        requires: config fields whose value must be one of the listed ones; the supported subset of a
            config class (Qwen3-MoE can mix dense layers in; minitron prunes all-MoE models only).
    """

    model_type: str
    layer_tensors: tuple[Tensor, ...]
    mlp_down: str | None = "mlp.down_proj"
    moe: str | None = None
    router: str | None = None
    memory: tuple[Tensor, ...] = ()
    global_tensors: tuple[Tensor, ...] = _GLOBALS
    multipliers: tuple[str, ...] = ()
    attn_out: str = "self_attn.o_proj"
    layer_norms: tuple[str, ...] = ("input_layernorm", "post_attention_layernorm")
    rms_norms: bool = True
    hidden_multiple_of_heads: bool = False
    ffn_key: str = "intermediate_size"
    experts_keys: tuple[str, ...] = ("num_local_experts",)
    requires: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def loads_width(self, hidden: int, heads: int) -> bool:
        """Whether this family's transformers config accepts ``hidden`` channels with ``heads`` query heads."""
        return not self.hidden_multiple_of_heads or hidden % heads == 0

    @property
    def is_moe(self) -> bool:
        return self.moe is not None

    def check(self, config: Any, where: str = "config.json") -> None:
        """Refuse, in one line, a config this family's table does not describe."""
        for key, allowed in self.requires.items():
            value = config_field(config, key)
            if value not in allowed:
                raise UserError(
                    f"{self.model_type} with {key}={value!r} is not supported",
                    where=where,
                    fix=f"minitron prunes {self.model_type} models with {key} in {list(allowed)} "
                    "(every decoder layer an MoE layer)",
                )


_GRANITE_MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier", "logits_scaling")

FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", _ATTENTION + _NORMS + _DENSE_MLP, hidden_multiple_of_heads=True),
        Family("mistral", _ATTENTION + _NORMS + _DENSE_MLP),
        Family("qwen2", _QWEN2_ATTENTION + _NORMS + _DENSE_MLP),
        Family("qwen3", _QWEN3_ATTENTION + _NORMS + _DENSE_MLP),
        Family(
            "qwen3_moe",
            _QWEN3_ATTENTION + _NORMS + _QWEN3_MOE_MLP,
            mlp_down=None,
            moe="mlp",
            router="mlp.gate",
            memory=_QWEN3_MOE_MEMORY,
            ffn_key="moe_intermediate_size",
            experts_keys=("num_experts", "num_local_experts"),
            # A layer is dense when listed in mlp_only_layers or when (i + 1) % decoder_sparse_step != 0.
            requires={"mlp_only_layers": ([], None), "decoder_sparse_step": (1, None)},
        ),
        Family("granite", _ATTENTION + _NORMS + _DENSE_MLP, multipliers=_GRANITE_MULTIPLIERS),
        Family(
            "granitemoe",
            _ATTENTION + _NORMS + _GRANITEMOE_MLP,
            mlp_down=None,
            moe="block_sparse_moe",
            router="block_sparse_moe.router",
            memory=_GRANITEMOE_MEMORY,
            multipliers=_GRANITE_MULTIPLIERS,
        ),
        Family(
            "nemotron",
            _ATTENTION + _NORMS_WITH_BIAS + _UNGATED_MLP,
            global_tensors=_GLOBALS + (Tensor("model.norm.bias", ("hidden",)),),
            rms_norms=False,
        ),
    )
}


def family_of(config: Any, where: str = "config.json") -> Family:
    """The :class:`Family` of a transformers config (or a ``config.json`` dict, read from ``where``)."""
    model_type = config["model_type"] if isinstance(config, dict) else getattr(config, "model_type", None)
    if not isinstance(model_type, str) or model_type not in FAMILIES:  # a list would not even hash
        raise UserError(
            f"unsupported model_type {model_type!r}",
            where=where,
            fix=f"minitron supports: {', '.join(sorted(FAMILIES))}",
        )
    family = FAMILIES[model_type]
    family.check(config, where)
    return family


def config_field(config: Any, key: str, default: Any = None) -> Any:
    """A config field from a transformers config or the dict read from its config.json."""
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


@dataclass(frozen=True)
class Shape:
    """The architecture numbers of a decoder-only model, the unit that plans and counts speak in."""

    model_type: str
    hidden: int
    ffn: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 0
    top_k: int = 0
    attention_bias: bool = False
    mlp_bias: bool = False

    @classmethod
    def from_config(cls, config: Any) -> "Shape":
        family = family_of(config)
        hidden, heads = config_field(config, "hidden_size"), config_field(config, "num_attention_heads")
        head_dim = config_field(config, "head_dim") or hidden // heads
        return cls(
            model_type=family.model_type,
            hidden=hidden,
            ffn=config_field(config, family.ffn_key),
            layers=config_field(config, "num_hidden_layers"),
            heads=heads,
            kv_heads=config_field(config, "num_key_value_heads") or heads,
            head_dim=head_dim,
            vocab=config_field(config, "vocab_size"),
            tied=bool(config_field(config, "tie_word_embeddings", False)),
            experts=next((config_field(config, k) for k in family.experts_keys if config_field(config, k)), 0) if family.is_moe else 0,
            top_k=(config_field(config, "num_experts_per_tok") or 0) if family.is_moe else 0,
            attention_bias=bool(config_field(config, "attention_bias", False)),
            mlp_bias=bool(config_field(config, "mlp_bias", False)),
        )

    @property
    def family(self) -> Family:
        return FAMILIES[self.model_type]

    def axis_sizes(self) -> dict[str, int]:
        return {
            "vocab": self.vocab,
            "hidden": self.hidden,
            "q": self.heads * self.head_dim,
            "kv": self.kv_heads * self.head_dim,
            "head_dim": self.head_dim,
            "ffn": self.ffn,
            "ffn2": 2 * self.ffn,
            "experts": self.experts,
        }

    def present(self, tensor: Tensor) -> bool:
        return tensor.when is None or bool(getattr(self, tensor.when))

    def layer_tensors(self) -> tuple[Tensor, ...]:
        """A decoder layer's tensors as stored on disk."""
        return tuple(t for t in self.family.layer_tensors if self.present(t))

    def memory_layer_tensors(self) -> tuple[Tensor, ...]:
        """A decoder layer's tensors as transformers holds them in memory (its ``state_dict``)."""
        memory = self.family.memory
        replaced = {part for t in memory for part in t.parts}
        out: list[Tensor] = []
        for t in self.layer_tensors():
            out += [m for m in memory if m.parts[0] == t.name] if t.name in replaced else [t]
        return tuple(out)

    def global_tensors(self) -> tuple[Tensor, ...]:
        return self.family.global_tensors + (() if self.tied else (LM_HEAD,))

    def tensor_shape(self, tensor: Tensor) -> tuple[int, ...]:
        """The shape of the whole tensor; for a per-expert one, of all its experts stacked."""
        sizes = self.axis_sizes()
        return tuple(sizes[a] for a in tensor.axes)

    def stored_shape(self, tensor: Tensor) -> tuple[int, ...]:
        """The shape of one stored tensor: one expert's for a per-expert tensor."""
        return self.tensor_shape(tensor)[1:] if tensor.per_expert else self.tensor_shape(tensor)

    def stored_names(self, name: str) -> list[str]:
        """The stored names of a table name: one per expert where it holds ``{e}``."""
        return [name.format(e=e) for e in range(self.experts)] if "{e}" in name else [name]

    def counts(self) -> dict[str, int]:
        """Parameter counts: total, embedding (input + untied output), non-embedding, active per token.

        Computed from the tensor table, so it is exact for every family; the tests check it against
        ``sum(p.numel())`` of the transformers model built on the meta device.
        """
        per_layer = sum(math.prod(self.tensor_shape(t)) for t in self.layer_tensors())
        globals_ = sum(math.prod(self.tensor_shape(t)) for t in self.global_tensors())
        total = per_layer * self.layers + globals_
        embedding = self.vocab * self.hidden * (1 if self.tied else 2)
        active = total
        if self.experts:
            # Only top-k of the experts' weights take part for each token; the router runs in full.
            expert_tensors = [t for t in self.layer_tensors() if t.axes[0] == "experts" and "ffn" in "".join(t.axes)]
            per_expert = sum(math.prod(self.tensor_shape(t)) // self.experts for t in expert_tensors)
            active = total - self.layers * per_expert * (self.experts - self.top_k)
        return {
            "total": total,
            "embedding": embedding,
            "non_embedding": total - embedding,
            "active": active,
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def replace(self, **changes: Any) -> "Shape":
        return Shape(**{**asdict(self), **changes})


def assemble(shape: Shape, tensor: Tensor, read: Any) -> Any:
    """An in-memory tensor from its on-disk ``parts``, as transformers' loading builds it: ``read(name)``
    returns one stored tensor; per-expert parts are concatenated per expert, then stacked over experts."""
    import torch

    if not tensor.parts:
        return read(tensor.name)
    if "{e}" not in tensor.parts[0]:
        return torch.cat([read(p) for p in tensor.parts])
    return torch.stack([torch.cat([read(p.format(e=e)) for p in tensor.parts]) for e in range(shape.experts)])


def config_updates(teacher: Shape, student: Shape, config: Any = None) -> dict[str, Any]:
    """The ``config.json`` fields that change when ``teacher`` is pruned to ``student``.

    ``head_dim`` is always written: once heads × head_dim ≠ hidden, transformers would otherwise derive a
    wrong one (Llama-3.1-Minitron-4B-Width keeps 32 heads of 128 with hidden 3072). The expert count is
    written under the alias(es) the teacher's ``config`` dict uses, so that no stale alias is left behind.
    """
    family = teacher.family
    updates: dict[str, Any] = {
        "hidden_size": student.hidden,
        family.ffn_key: student.ffn,
        "num_hidden_layers": student.layers,
        "num_attention_heads": student.heads,
        "num_key_value_heads": student.kv_heads,
        "head_dim": student.head_dim,
    }
    if teacher.experts:
        used = [k for k in family.experts_keys if isinstance(config, dict) and k in config]
        updates.update({k: student.experts for k in used or family.experts_keys[:1]})
        updates["num_experts_per_tok"] = min(student.top_k, student.experts)
    return updates


# --- models -------------------------------------------------------------------------------------------------------


def meta_model(config: Any) -> Any:
    """The full-size transformers model on the meta device: shapes without memory."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def logits_divisor(config: Any) -> float:
    """What the family divides its output logits by (Granite's ``logits_scaling``), 1.0 otherwise.

    A loss that computes logits from ``lm_head.weight`` itself must divide by this too.
    """
    return float(config_field(config, "logits_scaling", 1.0) or 1.0)

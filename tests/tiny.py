"""Tiny random models of every supported family, built from the real transformers config classes.

Each keeps its family's special features at toy size: Llama's llama3 rope scaling and a head_dim decoupled
from hidden_size, Qwen2's attention biases, Granite's four muP multipliers and tied embeddings, GraniteMoe's
router and fused experts, Qwen3's per-head q/k RMSNorms (with a decoupled head_dim and tied embeddings, as
Qwen3-4B), Qwen3-MoE's softmax-then-top-k router with renormalised weights and per-expert checkpoint tensors,
Nemotron's squared-ReLU MLP without a gate, LayerNorm1P with bias and partial rotary embeddings (half of a
head_dim that is decoupled from hidden_size, as in Minitron-8B).
"""

from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    GraniteConfig,
    GraniteMoeConfig,
    LlamaConfig,
    MistralConfig,
    NemotronConfig,
    Qwen2Config,
    Qwen3Config,
    Qwen3MoeConfig,
)

FAMILY_NAMES = ("llama", "mistral", "qwen2", "granite", "granitemoe", "qwen3", "qwen3_moe", "nemotron")

_COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
)
_GRANITE = dict(
    embedding_multiplier=12.0,
    residual_multiplier=0.22,
    attention_multiplier=0.0625,
    logits_scaling=8.0,
    tie_word_embeddings=True,
)


def tiny_config(model_type: str, **overrides):
    if model_type == "llama":
        cfg = LlamaConfig(
            **_COMMON,
            head_dim=32,  # 4 heads × 32 = 128 ≠ hidden 64, as in Minitron-4B-Width
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            },
            rope_theta=500000.0,
        )
    elif model_type == "mistral":
        cfg = MistralConfig(**_COMMON, head_dim=16)
    elif model_type == "qwen2":
        cfg = Qwen2Config(**_COMMON)
    elif model_type == "granite":
        cfg = GraniteConfig(**_COMMON, **_GRANITE)
    elif model_type == "granitemoe":
        cfg = GraniteMoeConfig(
            **{**_COMMON, "intermediate_size": 32}, **_GRANITE, num_local_experts=4, num_experts_per_tok=2
        )
    elif model_type == "qwen3":
        cfg = Qwen3Config(**_COMMON, head_dim=32, tie_word_embeddings=True)
    elif model_type == "qwen3_moe":
        cfg = Qwen3MoeConfig(
            **_COMMON, head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True
        )
    elif model_type == "nemotron":
        common = {k: v for k, v in _COMMON.items() if k != "rms_norm_eps"}
        cfg = NemotronConfig(**common, head_dim=24, partial_rotary_factor=0.5, norm_eps=1e-5, hidden_act="relu2")
    else:
        raise ValueError(model_type)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    return cfg


def tiny_model(model_type: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides))
    # Random init leaves norm weights at 1 (LayerNorm1P's at 0, for a scale of 1) and biases at 0; randomise
    # them so that tests exercise them.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                norm_weight = "norm" in name and name.endswith("weight")
                p.copy_(1.0 + 0.1 * torch.randn_like(p) if norm_weight else 0.1 * torch.randn_like(p))
    return model.eval()


def save_tiny(model_type: str, path, seed: int = 0, **overrides):
    model = tiny_model(model_type, seed=seed, **overrides)
    model.save_pretrained(path)
    return model


_TOKENIZER_CORPUS = (
    "the quick brown fox jumps over the lazy dog",
    "a small model learns from a big model by distillation",
    "pruning removes heads neurons channels and layers by importance",
    "calibration text is tokenized packed and scored",
)


def tiny_tokenizer(vocab_size: int = 128):
    """A fast BPE tokenizer trained in-process on a few lines: vocab ≤ 128 to match the tiny models, with
    ``<unk>`` for characters it has not seen and ``<eos>`` / ``<bos>`` special tokens."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<eos>", "<bos>"], show_progress=False)
    tok.train_from_iterator(_TOKENIZER_CORPUS, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")


def tiny_ids(n: int = 4, seq: int = 16, seed: int = 1, vocab_size: int = 128):
    """``[n, seq]`` seeded random token ids within the tiny models' vocabulary."""
    return torch.randint(0, vocab_size, (n, seq), generator=torch.Generator().manual_seed(seed))

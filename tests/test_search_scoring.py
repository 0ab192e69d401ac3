"""Held-out scoring (LM loss, KL to the teacher) and the short distillation before it."""

import copy

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_ids, tiny_model

from minitron.search_scoring import HeldOut, short_distill


def test_heldout_loss_equals_naive_cross_entropy_and_ignores_batching(family_name):
    model, ids = tiny_model(family_name), tiny_ids()
    with torch.no_grad():
        logits = model(ids).logits
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    for batch_size in (1, 3, 4):
        assert HeldOut(model, ids, batch_size=batch_size).score(model, "loss") == pytest.approx(naive, rel=1e-5)
    assert HeldOut(model, ids, need_teacher=True).score(model, "kl") == pytest.approx(0.0, abs=1e-6)


def test_short_distillation_of_a_bf16_candidate_trains_float32_master_weights():
    """A GPU search prunes candidates in the teacher's bf16. AdamW stepping bf16 weights rounds every update
    below half an ulp away (norm weights near 1 never move at these learning rates); on float32 master weights
    every tensor moves, and the result is the float32 run's up to bf16 compute."""
    teacher = tiny_model("llama", initializer_range=0.3).to(torch.bfloat16)
    student = tiny_model("llama", seed=1, initializer_range=0.3, num_hidden_layers=2).to(torch.bfloat16)
    start = {name: p.detach().float().clone() for name, p in student.named_parameters()}
    untrained = copy.deepcopy(student).float()
    reference = copy.deepcopy(untrained)  # the same starting weights, trained in float32 throughout
    teacher32 = copy.deepcopy(teacher).float()
    ids = tiny_ids(8, 16)
    short_distill(student, teacher, ids, steps=3, lr=1e-3, batch_size=4, seed=0)
    short_distill(reference, teacher32, ids, steps=3, lr=1e-3, batch_size=4, seed=0)

    trained = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        moved, expected = p.detach() - start[name], trained[name].detach() - start[name]
        # Rows of tokens absent from the 128 training tokens get no gradient: only embeddings may keep some.
        assert (moved != 0).all() if "embed" not in name else (moved != 0).any(), name
        assert F.cosine_similarity(moved.flatten(), expected.flatten(), dim=0) > 0.9, name
    assert all(p.dtype == torch.float32 for p in student.parameters())  # left on its master weights
    heldout = HeldOut(teacher32, tiny_ids(4, 16, seed=5), need_teacher=True)
    before = heldout.score(untrained, "kl")
    gained, expected_gain = before - heldout.score(student, "kl"), before - heldout.score(reference, "kl")
    assert expected_gain > 0 and gained == pytest.approx(expected_gain, rel=0.1)

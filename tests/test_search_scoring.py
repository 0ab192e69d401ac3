"""Held-out scoring (LM loss, KL to the teacher) and the short distillation before it."""

import pytest
import torch
import torch.nn.functional as F
from tiny import tiny_ids, tiny_model

from minitron.search_scoring import HeldOut


def test_heldout_loss_equals_naive_cross_entropy_and_ignores_batching(family_name):
    model, ids = tiny_model(family_name), tiny_ids()
    with torch.no_grad():
        logits = model(ids).logits
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    for batch_size in (1, 3, 4):
        assert HeldOut(model, ids, batch_size=batch_size).score(model, "loss") == pytest.approx(naive, rel=1e-5)
    assert HeldOut(model, ids, need_teacher=True).score(model, "kl") == pytest.approx(0.0, abs=1e-6)

"""Depth strategies: which layers to drop (window, loss, block), measured on tiny models."""

import pytest
import torch
from tiny import tiny_ids, tiny_model

from minitron.errors import UserError
from minitron.search_depth import DepthChooser, layer_loss_rise
from minitron.search_scoring import HeldOut


def silence_layers(model, layers):
    """Zero the output projections of ``layers``: each then adds nothing to the residual stream."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) in layers:
                if "o_proj" in parts or "down_proj" in parts or "output_linear" in parts:
                    p.zero_()


def test_window_strategy_finds_the_silent_block(family_name):
    # A larger init than the default 0.02 so that the tiny models' logits are far from uniform and every
    # real layer visibly moves the KL.
    model = tiny_model(family_name, initializer_range=0.3)
    silence_layers(model, {1, 2})
    ids = tiny_ids()
    with torch.no_grad():
        before = model(ids).logits
    heldout = HeldOut(model, ids, batch_size=2, need_teacher=True)
    chooser = DepthChooser("window", model, None, heldout, rank_by="kl")
    assert chooser(2) == [1, 2]
    window = chooser.measurements["window_2"]
    assert len(window) == 3 and window[1] == pytest.approx(0.0, abs=1e-7) and min(window[0], window[2]) > 1e-4
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)  # every skipped layer was put back


def test_loss_strategy_measures_the_rise_of_each_layer(family_name):
    model = tiny_model(family_name, initializer_range=0.3)
    silence_layers(model, {1})
    heldout = HeldOut(model, tiny_ids())
    rises = layer_loss_rise(model, heldout)
    assert len(rises) == 4 and rises[1] == pytest.approx(0.0, abs=1e-6)
    chooser = DepthChooser("loss", model, None, heldout)
    assert chooser(2) == sorted(sorted(range(4), key=lambda i: rises[i])[:2])
    # Measured once by the importance stage: taken from the scores, not re-measured.
    given = type("S", (), {"tensors": {"layer_loss": torch.tensor([0.3, 0.1, 0.2, 0.0])}})()
    assert DepthChooser("loss", model, given, None)(2) == [1, 3]


def test_block_strategy_uses_block_importance_once():
    scores = type("S", (), {"tensors": {"blocks": torch.tensor([0.9, 0.2, 0.2, 0.5, 0.1, 0.8])}})()
    chooser = DepthChooser("block", None, scores, None)
    assert chooser(1) == [4] and chooser(3) == [1, 2, 4]  # ties go to the lower index
    with pytest.raises(UserError, match="--depth-strategy"):
        DepthChooser("block", None, None, None)(1)
    with pytest.raises(UserError, match="--depth-strategy"):
        DepthChooser("window", None, None, None)(1)
    with pytest.raises(UserError, match="unknown depth strategy"):
        DepthChooser("random", None, None, None)

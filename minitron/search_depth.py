"""Depth strategies: which ``n`` decoder layers to drop (``--depth-strategy``), measured on the teacher."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from torch import nn

from minitron.errors import UserError
from minitron.search_scoring import HeldOut

DEPTH_STRATEGIES = ("window", "block", "loss")


class _PassThrough(nn.Module):
    """Stands in for a decoder layer and returns its input: the layer is skipped, nothing is copied."""

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states


class _Skipping:
    """Context manager: ``model`` runs with some decoder layers replaced by pass-throughs, then restored."""

    def __init__(self, model: Any, layers: Iterable[int]):
        self.stack, self.layers = model.base_model.layers, sorted(set(layers))

    def __enter__(self):
        self.saved = {i: self.stack[i] for i in self.layers}
        for i in self.layers:
            self.stack[i] = _PassThrough()

    def __exit__(self, *exc):
        for i, layer in self.saved.items():
            self.stack[i] = layer


def layer_loss_rise(model: Any, heldout: HeldOut) -> list[float]:
    """For each layer, how much the held-out LM loss rises when that layer alone is skipped."""
    base = heldout.score(model, "loss")
    rises = []
    for i in range(len(model.base_model.layers)):
        with _Skipping(model, [i]):
            rises.append(heldout.score(model, "loss") - base)
    return rises


def window_losses(model: Any, heldout: HeldOut, n_drop: int, rank_by: str) -> list[float]:
    """Held-out score of the teacher with each contiguous window of ``n_drop`` layers skipped (by start)."""
    n_layers = len(model.base_model.layers)
    out = []
    for start in range(n_layers - n_drop + 1):
        with _Skipping(model, range(start, start + n_drop)):
            out.append(heldout.score(model, rank_by))
    return out


def _lowest(values: Sequence[float], n: int) -> list[int]:
    # Stable: among equal scores the lower layer index goes first, so the choice is reproducible.
    return sorted(sorted(range(len(values)), key=lambda i: (values[i], i))[:n])


class DepthChooser:
    """Which ``n`` layers to drop, by one of the strategies, with every measurement done at most once.

    * ``block``: the ``n`` layers of lowest block importance (1 − cos between a layer's input and output,
      ``Scores.blocks``). Computed once on the full teacher, as in 2407.14679 §2.2, not re-measured after
      each removal: re-measuring costs a calibration pass per dropped layer and the paper ranks from one pass.
    * ``loss``: the ``n`` layers whose removal alone raises the LM loss least (``Scores.layer_loss`` when the
      importance stage measured it, else measured here on the held-out tokens, one pass per layer).
    * ``window``: the contiguous run of ``n`` layers whose joint removal hurts the held-out LM loss (or KL to
      the teacher, with ``--rank-by kl``) least. Layers interact: the papers found dropping one contiguous
      block (Llama-3.1-Minitron-4B-Depth drops 16–31) beats dropping the individually least important ones.
    """

    def __init__(self, strategy: str, teacher: Any, scores: Any, heldout: HeldOut | None, rank_by: str = "loss"):
        if strategy not in DEPTH_STRATEGIES:
            raise UserError(
                f"unknown depth strategy {strategy!r}",
                where="--depth-strategy",
                fix=f"choose {', '.join(DEPTH_STRATEGIES)}",
            )
        self.strategy, self.teacher, self.scores = strategy, teacher, scores
        self.heldout, self.rank_by = heldout, rank_by
        self._cache: dict[int, list[int]] = {}
        self._layer_loss: list[float] | None = None
        self.measurements: dict[str, Any] = {}

    def __call__(self, n_drop: int) -> list[int]:
        if n_drop <= 0:
            return []
        if n_drop not in self._cache:
            self._cache[n_drop] = self._choose(n_drop)
        return self._cache[n_drop]

    def _choose(self, n_drop: int) -> list[int]:
        if self.strategy == "block":
            if self.scores is None or "blocks" not in self.scores.tensors:
                raise UserError("block importance needs scores with 'blocks'", where="--depth-strategy block",
                                fix="pass --scores from `minitron importance`, or use --depth-strategy window")
            blocks = self.scores.tensors["blocks"].double().tolist()
            self.measurements["blocks"] = blocks
            return _lowest(blocks, n_drop)
        if self.strategy == "loss":
            if self._layer_loss is None:
                if self.scores is not None and "layer_loss" in self.scores.tensors:
                    self._layer_loss = self.scores.tensors["layer_loss"].double().tolist()
                else:
                    self._layer_loss = layer_loss_rise(self.teacher, self._need_heldout())
                self.measurements["layer_loss"] = self._layer_loss
            return _lowest(self._layer_loss, n_drop)
        scores = window_losses(self.teacher, self._need_heldout(), n_drop, self.rank_by)
        self.measurements[f"window_{n_drop}"] = scores
        start = min(range(len(scores)), key=lambda s: (scores[s], s))
        return list(range(start, start + n_drop))

    def _need_heldout(self) -> HeldOut:
        if self.heldout is None:
            raise UserError(f"depth strategy {self.strategy!r} measures held-out loss", where="--depth-strategy",
                            fix="pass --calib DATA, or use --depth-strategy block with --scores")
        return self.heldout

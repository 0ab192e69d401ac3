"""Scoring a model on held-out tokens, and the short distillation that may precede it.

:class:`HeldOut` measures a model's LM loss (or KL to the teacher) on token blocks the importance scores never
saw; the search ranks candidate students by it and the depth strategies (``search_depth``) measure layer
removals with it. :func:`short_distill` retrains a candidate for ``--search-steps`` steps before it is scored
(the lightweight architecture search of Minitron, arXiv 2407.14679 §3: the best shape right after pruning is
not always the best after retraining, and a few hundred steps are enough to tell them apart).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

RANK_BY = ("loss", "kl")


def _head_input(model: Any, ids: Any) -> Any:
    """The hidden states that feed the output head ``[B, T, D]``: the losses apply the head themselves, in
    chunks, so no ``tokens × vocab`` logits are ever materialised."""
    return model.base_model(input_ids=ids, use_cache=False).last_hidden_state


class HeldOut:
    """Held-out token blocks ``[N, T]`` and, for KL, the teacher's head inputs on them (computed once).

    Scores are sums over tokens divided by the token count of the whole set, so batching does not change them.
    """

    def __init__(self, teacher: Any, blocks: Any, *, batch_size: int = 4, need_teacher: bool = False):
        self.blocks, self.batch_size = blocks, max(1, batch_size)
        self.teacher_head = None
        self.teacher_hidden: list[Any] = []
        if need_teacher:
            device = next(teacher.parameters()).device
            with torch.no_grad():
                self.teacher_hidden = [_head_input(teacher, b.to(device)) for b in self.batches()]
            from minitron.losses import output_head

            self.teacher_head = output_head(teacher)

    def batches(self) -> list[Any]:
        return list(self.blocks.split(self.batch_size))

    def score(self, model: Any, rank_by: str) -> float:
        """Mean LM loss (next-token cross entropy) or mean KL(teacher ‖ model) per token; lower is better."""
        from minitron.losses import forward_kl, lm_loss, output_head

        head, divisor = output_head(model)
        device = head.device
        total, count = 0.0, 0
        with torch.no_grad():
            for k, batch in enumerate(self.batches()):
                batch = batch.to(device)
                hidden = _head_input(model, batch)
                if rank_by == "loss":
                    # Position t predicts token t+1: drop the last hidden state and the first label.
                    total += float(lm_loss(hidden[:, :-1], head, batch[:, 1:], divisor=divisor, normalizer=1.0))
                    count += batch[:, 1:].numel()
                else:
                    t_head, t_divisor = self.teacher_head
                    total += float(
                        forward_kl(
                            hidden, head, self.teacher_hidden[k], t_head,
                            student_divisor=divisor, teacher_divisor=t_divisor, normalizer=1.0,
                        )
                    )
                    count += batch.numel()
        return total / count


# --- the short distillation before scoring (--search-steps) --------------------------------------------------


OBJECTIVES = ("kd", "lm", "kd+lm")


def short_distill(
    student: Any, teacher: Any, blocks: Any, *, steps: int, lr: float, batch_size: int, seed: int,
    objective: str = "kd", on_step: Any = None,
) -> None:
    """``steps`` steps of logit distillation (forward KL, τ = 1, AdamW, constant LR, grad-norm clip 1).

    Just enough retraining to let the candidates recover before they are compared (2407.14679 §3: the ranking
    right after pruning changes after a few hundred steps, then stays put). ``objective`` ``"lm"`` trains on the
    next-token loss alone (conventional retraining; ``teacher`` unused) and ``"kd+lm"`` on their sum, as the
    ablations of ``minitron study`` compare; ``on_step(step)`` is called after each optimizer step.

    The student trains on float32 master weights and is left in float32, as ``distill`` trains: a candidate
    pruned from a bf16 teacher (a GPU search loads the checkpoint's dtype) would otherwise step AdamW on bf16
    parameters, where an update below half a unit in the last place rounds away: norm weights near 1 (ulp
    2⁻⁷) never move at a search LR of 1e-4, and many other weights freeze too. The forward and backward still
    run in the weights' original half precision under autocast, as ``distill`` computes with ``precision: bf16``.
    """
    from minitron.losses import combine_losses, forward_kl, lm_loss, output_head

    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not one of {OBJECTIVES}")
    torch.manual_seed(seed)
    device = next(student.parameters()).device
    half = next(student.parameters()).dtype
    compute = torch.autocast(device.type, dtype=half) if half != torch.float32 else contextlib.nullcontext()
    student.float()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    t_head, t_divisor = output_head(teacher) if objective != "lm" else (None, 1.0)
    student.train()
    # A seeded order of the training blocks, the same for every candidate so that they see the same tokens.
    order = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))
    batches = blocks[order].split(max(1, batch_size))
    for step in range(steps):
        ids = batches[step % len(batches)].to(device)
        t_hidden = None
        if objective != "lm":
            with torch.no_grad():
                t_hidden = _head_input(teacher, ids)
        with compute:
            s_head, s_divisor = output_head(student)
            hidden = _head_input(student, ids)
            # Position t predicts token t+1: the LM loss drops the last hidden state and the first label.
            lm = lm_loss(hidden[:, :-1], s_head, ids[:, 1:], divisor=s_divisor) if objective != "kd" else None
            if objective == "lm":
                loss = lm
            else:
                kd = forward_kl(hidden, s_head, t_hidden, t_head, student_divisor=s_divisor, teacher_divisor=t_divisor)
                loss = combine_losses(kd, lm=lm)["total"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if on_step is not None:
            student.eval()
            on_step(step + 1)
            student.train()
    student.eval()

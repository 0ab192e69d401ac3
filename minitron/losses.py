"""Distillation losses: forward KL on logits, LM cross entropy, hidden-state losses.

The logit losses never materialise full-vocabulary logits for all tokens. They take the *hidden states
that feed the output head* and the head's weight, and walk the tokens in chunks of ``chunk_size`` rows:
each chunk's logits are computed, turned into the loss and, in the same pass, into the gradient with
respect to the student's hidden states and head weight, then dropped. Only those two gradients are kept
for the backward pass (the same trick as Liger-Kernel's fused linear losses), so

* peak memory is a few ``chunk_size × vocab`` float32 blocks plus one ``vocab × hidden`` float32
  gradient buffer, flat in the number of tokens (naive: several ``tokens × vocab`` blocks);
* there is no recomputation: the four matrix products (student logits, teacher logits, d/d hidden,
  d/d head) are the ones autograd would do for the naive loss, and the softmax gradient is written in
  closed form instead of being traced through ``log_softmax`` and ``kl_div``.

Numerics: the matrix products run in the inputs' dtype (bf16 on GPU uses fp32 accumulation), everything
from the logits on (softmax, KL, gradient of the logits) is float32, and the head-weight gradient is
accumulated over chunks in float32 before being cast back once.

Why not a library:

* nvidia-modelopt's ``LogitsDistillationLoss`` (``modelopt/torch/distill/losses.py``) takes full logits of
  both models, i.e. exactly the ``tokens × vocab`` tensors this module exists to avoid; with
  ``reduction="mean"`` it also averages over tokens *and* vocabulary entries, not per token. Its
  ``LogitsAndIntermediatesLossBalancer`` (Megatron plugin) is the dynamic weighting we mirror in
  :func:`combine_losses`, but it is tied to Megatron-Core models.
* Liger-Kernel's ``LigerFusedLinearJSD`` fuses the head with a generalised JSD (forward KL at
  ``beta=0``), but it needs Triton and a GPU, has no logit divisor (Granite's ``logits_scaling``), no
  T² factor, no external normaliser for gradient accumulation, and allocates a float32 ``tokens × vocab``
  buffer for its per-element loss, which defeats the memory goal at a 128k vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minitron.families import logits_divisor

IGNORE_INDEX = -100

# (start, stop, student_logits) -> (sum of the loss over those rows, d sum / d student_logits or None).
# ``student_logits`` is a fresh float32 [rows, V] block the function may overwrite.
_ChunkLoss = Callable[[int, int, Tensor, bool], tuple[Tensor, Tensor | None]]


# ---------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------


def forward_kl(
    student_hidden: Tensor,
    student_head: Tensor,
    teacher_hidden: Tensor,
    teacher_head: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    student_divisor: float = 1.0,
    teacher_divisor: float = 1.0,
    chunk_size: int = 1024,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """KL(teacher ‖ student) on the logits ``hidden @ head.T / divisor``, chunked over tokens.

    Args:
        student_hidden: ``[N, D]`` (or ``[..., D]``) input of the student's output head.
        student_head: ``[V, D]`` the student's output-head weight (``lm_head.weight``, or the tied
            embedding).
        teacher_hidden: ``[N, D']`` input of the teacher's output head; never receives a gradient.
        teacher_head: ``[V, D']`` the teacher's output-head weight; never receives a gradient.
        mask: ``[N]`` bool, True for tokens that count. ``None``: all tokens count.
        temperature: τ. Both distributions are ``softmax(logits / τ)``; the loss is multiplied by τ²
            because the gradient of the softened KL scales as 1/τ², and τ² keeps its size (relative to
            the LM loss) independent of τ (Hinton et al. 2015).
        student_divisor, teacher_divisor: what each model divides its logits by
            (:func:`minitron.families.logits_divisor`: Granite's ``logits_scaling``, else 1).
        chunk_size: tokens per chunk; memory is ~4 × ``chunk_size × V`` float32 values.
        normalizer: what the summed per-token KL is divided by. ``None``: the number of valid tokens
            in this call (a mean). Pass the valid-token count of the whole global batch (summed over
            micro-batches and processes) so that accumulated / all-reduced gradients equal those of one
            big batch. Values below 1 count as 1, so an all-ignored batch gives 0 instead of NaN.

    Returns:
        float32 scalar: ``τ² · Σ_valid KL_τ(teacher ‖ student) / normalizer``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    student_hidden, teacher_hidden, mask = _flatten(student_hidden, teacher_hidden, mask)
    _check_head("student", student_hidden, student_head)
    _check_head("teacher", teacher_hidden, teacher_head)
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(f"student has {student_hidden.shape[0]} tokens, teacher {teacher_hidden.shape[0]}")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"vocabularies differ: student {student_head.shape[0]}, teacher {teacher_head.shape[0]}")

    student_hidden, student_head = _autocast_inputs(student_hidden, student_head)
    teacher_hidden, teacher_head = _autocast_inputs(teacher_hidden.detach(), teacher_head.detach())
    count, rows = _valid_rows(mask, student_hidden)
    if rows is not None:  # drop ignored tokens up front: they cost nothing and cannot leak NaN/inf
        student_hidden, teacher_hidden = student_hidden[rows], teacher_hidden[rows]

    student_scale = 1.0 / (student_divisor * temperature)
    teacher_scale = 1.0 / (teacher_divisor * temperature)

    def chunk_kl(start: int, stop: int, student_logits: Tensor, need_grad: bool):
        teacher_logits = (teacher_hidden[start:stop] @ teacher_head.T).float()
        log_pt = torch.log_softmax(teacher_logits.mul_(teacher_scale), dim=-1)
        del teacher_logits
        log_ps = torch.log_softmax(student_logits.mul_(student_scale), dim=-1)
        del student_logits
        pt = log_pt.exp()
        # Σ p_t (log p_t − log p_s), in place (no extra [rows, V] temporary). A reduction, not torch.dot:
        # a BLAS dot product over rows × V (tens of millions) terms accumulates its float32 sum serially
        # and was off by 0.2 % at 512 × 128k on the CPU; torch's sum adds pairwise.
        kl = log_pt.sub_(log_ps).mul_(pt).sum()
        if not need_grad:
            return kl, None
        # d KL / d z_s = (p_s − p_t) for z_s = logits / (divisor · τ); chain rule gives the scale.
        return kl, log_ps.exp_().sub_(pt).mul_(student_scale)

    total = _fused_head_loss(student_hidden, student_head, chunk_kl, chunk_size)
    return total * (temperature**2) / _denominator(normalizer, count)


def lm_loss(
    student_hidden: Tensor,
    student_head: Tensor,
    labels: Tensor,
    *,
    divisor: float = 1.0,
    chunk_size: int = 1024,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Cross entropy of the student's next-token prediction, chunked like :func:`forward_kl`.

    Args:
        student_hidden: ``[N, D]`` (or ``[..., D]``) input of the output head.
        student_head: ``[V, D]`` output-head weight.
        labels: ``[N]`` (or ``[...]``) target token ids, already shifted to line up with the hidden
            states; ``-100`` is ignored.
        divisor: the model's logit divisor (Granite's ``logits_scaling``).
        chunk_size, normalizer: as in :func:`forward_kl`.

    Returns:
        float32 scalar: ``Σ_valid −log p(label) / normalizer`` (by default the mean over valid labels).
    """
    labels = labels.reshape(-1)
    student_hidden = student_hidden.reshape(-1, student_hidden.shape[-1])
    _check_head("student", student_hidden, student_head)
    if labels.shape[0] != student_hidden.shape[0]:
        raise ValueError(f"{labels.shape[0]} labels for {student_hidden.shape[0]} hidden states")
    student_hidden, student_head = _autocast_inputs(student_hidden, student_head)
    count, rows = _valid_rows(labels != IGNORE_INDEX, student_hidden)
    if rows is not None:
        student_hidden, labels = student_hidden[rows], labels[rows]
    scale = 1.0 / divisor

    def chunk_ce(start: int, stop: int, logits: Tensor, need_grad: bool):
        target = labels[start:stop].unsqueeze(1)
        log_p = torch.log_softmax(logits.mul_(scale), dim=-1)
        del logits
        loss = -log_p.gather(1, target).sum()
        if not need_grad:
            return loss, None
        grad = log_p.exp_()  # d(−log p_y)/dz = softmax − one_hot(y)
        grad.scatter_add_(1, target, torch.full_like(target, -1.0, dtype=grad.dtype))
        return loss, grad.mul_(scale)

    total = _fused_head_loss(student_hidden, student_head, chunk_ce, chunk_size)
    return total / _denominator(normalizer, count)


def naive_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    mask: Tensor | None = None,
    temperature: float = 1.0,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reference forward KL on materialised logits ``[..., V]`` (already divided by their divisors).

    Same definition as :func:`forward_kl`: ``τ² · Σ_valid KL_τ(teacher ‖ student) / normalizer``, in
    float32. Used by the tests and the benchmark; holds several ``N × V`` float32 tensors.
    """
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab).float()
    teacher = teacher_logits.reshape(-1, vocab).float().detach()
    if temperature != 1.0:  # skip a needless N × V copy, to keep the benchmark's baseline honest
        student, teacher = student / temperature, teacher / temperature
    log_ps = torch.log_softmax(student, dim=-1)
    log_pt = torch.log_softmax(teacher, dim=-1)
    per_token = F.kl_div(log_ps, log_pt, reduction="none", log_target=True).sum(-1)
    valid = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
    total = per_token.masked_fill(~valid, 0.0).sum()
    return total * (temperature**2) / _denominator(normalizer, valid.sum())


def output_head(model: Any) -> tuple[Tensor, float]:
    """``(weight [V, D], logit divisor)`` of a causal LM's output head, for the fused losses.

    The weight is the parameter itself (tied to the embedding for Granite), so gradients reach it; the
    divisor comes from :func:`minitron.families.logits_divisor` so Granite's ``logits_scaling`` is never
    forgotten.
    """
    return model.get_output_embeddings().weight, logits_divisor(model.config)


# ---------------------------------------------------------------------------------------------------
# hidden-state losses (2407.14679 §3, optional)
# ---------------------------------------------------------------------------------------------------


def layer_outputs(base_model: nn.Module, want: bool, **inputs: Any) -> tuple[Any, list[Tensor] | None]:
    """Run a decoder stack (``model.base_model``) and, with ``want``, return the states that hidden-state
    pairs name: ``states[0]`` the embeddings, ``states[i]`` the residual stream after decoder layer ``i``
    (1-based), every one *before* the final norm.

    transformers 5's ``hidden_states[i]`` is exactly that for ``i`` below the layer count, but its last entry
    is the final norm's output (``last_hidden_state``), not the last layer's. A pair naming one model's last
    layer and another layer of the other would compare a normalised state with a raw one; so the last entry
    is replaced by the last layer's own output, caught by a forward hook for this one call.
    """
    if not want:
        return base_model(**inputs), None
    caught: dict[str, Tensor] = {}

    def catch(module, args, output):
        caught["last"] = output[0] if isinstance(output, tuple) else output

    handle = base_model.layers[-1].register_forward_hook(catch)
    try:
        out = base_model(**inputs, output_hidden_states=True)
    finally:
        handle.remove()
    return out, [*out.hidden_states[:-1], caught["last"]]


class HiddenStateLoss(nn.Module):
    """Distance between a student hidden state and the teacher's at the paired layer.

    When the widths differ (width-pruned student) a bias-free linear projection, trained with the
    student, maps the student's state to the teacher's width first; distill keeps it only for training.

    Args:
        student_dim, teacher_dim: widths of the paired states.
        kind: ``"cosine"`` (1 − cos per token) or ``"mse"`` (mean squared difference per token).
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: Literal["cosine", "mse"] = "cosine"):
        super().__init__()
        if kind not in ("cosine", "mse"):
            raise ValueError(f"kind must be 'cosine' or 'mse', got {kind!r}")
        self.kind = kind
        self.proj = nn.Linear(student_dim, teacher_dim, bias=False) if student_dim != teacher_dim else nn.Identity()

    def forward(
        self,
        student_hidden: Tensor,
        teacher_hidden: Tensor,
        *,
        mask: Tensor | None = None,
        normalizer: float | Tensor | None = None,
    ) -> Tensor:
        """``[..., D]`` student and ``[..., D']`` teacher states → float32 scalar, per-token mean."""
        student = self.proj(student_hidden).float().reshape(-1, teacher_hidden.shape[-1])
        teacher = teacher_hidden.detach().float().reshape(-1, teacher_hidden.shape[-1])
        if self.kind == "cosine":
            per_token = 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
        else:
            per_token = (student - teacher).pow(2).mean(-1)
        valid = torch.ones_like(per_token, dtype=torch.bool) if mask is None else mask.reshape(-1).bool()
        # where(), not multiply: a masked padding row with inf/NaN must not poison the sum.
        total = torch.where(valid, per_token, torch.zeros_like(per_token)).sum()
        return total / _denominator(normalizer, valid.sum())


def combine_losses(
    kd: Tensor,
    *,
    lm: Tensor | None = None,
    hidden: Sequence[Tensor] = (),
    kd_weight: float = 1.0,
    lm_weight: float = 1.0,
) -> dict[str, Tensor]:
    """Total training loss with 2407.14679's dynamic weighting of the intermediate-state losses.

    ``total = lm_weight · L_lm + kd_weight · L_logits + α · L_is``, where ``L_is`` is the mean of the
    hidden-state losses and ``α = L_logits / L_is`` is recomputed every step from *detached* values, so
    the intermediate term always has the logit loss's magnitude while its gradient still points along
    ∇L_is (the same rule as ModelOpt's ``LogitsAndIntermediatesLossBalancer``). ``α`` depends on each
    micro-batch's own values, so with hidden-state losses on, accumulation is equivalent to a big batch
    only approximately.

    Returns:
        ``{"total", "kd", "lm" (if given), "hidden" (if any), "alpha" (if any)}``; all but ``total`` detached.
    """
    total = kd_weight * kd
    out = {"kd": kd.detach()}
    if lm is not None:
        total = total + lm_weight * lm
        out["lm"] = lm.detach()
    if hidden:
        intermediate = torch.stack([h.float() for h in hidden]).mean()
        alpha = (kd.detach() / intermediate.detach()) if intermediate.detach() > 0 else kd.new_zeros(())
        total = total + alpha * intermediate
        out["hidden"], out["alpha"] = intermediate.detach(), alpha
    out["total"] = total
    return out


# ---------------------------------------------------------------------------------------------------
# the fused head: chunked forward that also produces the gradients
# ---------------------------------------------------------------------------------------------------


def _fused_head_loss(hidden: Tensor, head: Tensor, chunk_loss: _ChunkLoss, chunk_size: int) -> Tensor:
    """Σ over rows of ``chunk_loss`` on ``hidden @ head.T``, differentiable w.r.t. ``hidden`` and ``head``."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    grad_on = torch.is_grad_enabled()
    need_hidden, need_head = grad_on and hidden.requires_grad, grad_on and head.requires_grad
    if not (need_hidden or need_head):  # evaluation: no gradient work, no autograd node
        return _run_chunks(hidden, head, chunk_loss, chunk_size, False, False)[0]
    return _FusedHead.apply(hidden, head, chunk_loss, chunk_size, need_hidden, need_head)


class _FusedHead(torch.autograd.Function):
    """Computes the loss and its gradients in forward; backward only scales the stored gradients.

    A loss is the last node of the graph, so the incoming gradient is a scalar: storing d loss / d input
    costs ``N × D + V × D`` and saves keeping (or recomputing) any logits.
    """

    @staticmethod
    def forward(ctx, hidden, head, chunk_loss, chunk_size, need_hidden, need_head):
        total, grad_hidden, grad_head = _run_chunks(hidden, head, chunk_loss, chunk_size, need_hidden, need_head)
        ctx.head_dtype = head.dtype
        ctx.save_for_backward(grad_hidden, grad_head)
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_hidden, grad_head = ctx.saved_tensors
        if grad_hidden is not None:
            grad_hidden = grad_hidden * grad_out.to(grad_hidden.dtype)
        if grad_head is not None:
            grad_head = (grad_head * grad_out).to(ctx.head_dtype)
        return grad_hidden, grad_head, None, None, None, None


def _run_chunks(hidden, head, chunk_loss, chunk_size, need_hidden, need_head):
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    # float32 accumulator: summing per-chunk bf16 products would round once per chunk.
    grad_head = torch.zeros(head.shape, dtype=torch.float32, device=head.device) if need_head else None
    need_grad = need_hidden or need_head
    with torch.no_grad():
        for start in range(0, hidden.shape[0], chunk_size):
            stop = min(start + chunk_size, hidden.shape[0])
            rows = hidden[start:stop]
            loss, grad_logits = chunk_loss(start, stop, (rows @ head.T).float(), need_grad)
            total += loss
            if grad_logits is None:
                continue
            grad_logits = grad_logits.to(head.dtype)
            if need_hidden:
                torch.matmul(grad_logits, head, out=grad_hidden[start:stop])
            if need_head:
                if grad_head.dtype == grad_logits.dtype:
                    grad_head.addmm_(grad_logits.T, rows)
                else:
                    grad_head += grad_logits.T @ rows
    return total, grad_hidden, grad_head


# ---------------------------------------------------------------------------------------------------
# small helpers
# ---------------------------------------------------------------------------------------------------


def _flatten(student: Tensor, teacher: Tensor, mask: Tensor | None):
    student = student.reshape(-1, student.shape[-1])
    teacher = teacher.reshape(-1, teacher.shape[-1])
    if mask is not None:
        mask = mask.reshape(-1)
        if mask.shape[0] != student.shape[0]:
            raise ValueError(f"mask has {mask.shape[0]} entries for {student.shape[0]} tokens")
    return student, teacher, mask


def _check_head(who: str, hidden: Tensor, head: Tensor) -> None:
    if head.dim() != 2 or head.shape[1] != hidden.shape[1]:
        raise ValueError(f"{who} head {tuple(head.shape)} does not match hidden width {hidden.shape[1]}")


def _autocast_inputs(hidden: Tensor, head: Tensor) -> tuple[Tensor, Tensor]:
    """Cast to autocast's dtype where autocast is on: it does not reach inside an autograd.Function,
    and an ``lm_head`` under autocast would have run in that dtype."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        return hidden.to(dtype), head.to(dtype)
    if hidden.dtype != head.dtype:
        raise ValueError(f"hidden states are {hidden.dtype} but the head is {head.dtype}")
    return hidden, head


def _valid_rows(mask: Tensor | None, hidden: Tensor) -> tuple[int, Tensor | None]:
    """(number of valid tokens, their row indices or None when all rows are valid)."""
    if mask is None:
        return hidden.shape[0], None
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    rows = mask.nonzero().squeeze(1)
    return rows.numel(), rows


def _denominator(normalizer: float | Tensor | None, count: int | Tensor) -> float | Tensor:
    if normalizer is None:
        normalizer = count
    if isinstance(normalizer, Tensor):
        return normalizer.float().clamp_min(1.0)
    return max(float(normalizer), 1.0)

"""The chunked logit losses equal the naive ones (value and gradient), and the hidden-state losses."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from minitron.losses import (
    HiddenStateLoss,
    combine_losses,
    forward_kl,
    layer_outputs,
    lm_loss,
    naive_forward_kl,
    output_head,
)
from tiny import tiny_model

RECIPES = Path(__file__).parents[1] / "recipes"


def make(n=29, d=12, dt=20, vocab=53, dtype=torch.float32, seed=0):
    """Student / teacher hidden states and heads; logits of a realistic spread (std ~3)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, d, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(vocab, d, generator=g) / math.sqrt(d) * 3).to(dtype).requires_grad_()
    ht = torch.randn(n, dt, generator=g).to(dtype)
    wt = (torch.randn(vocab, dt, generator=g) / math.sqrt(dt) * 3).to(dtype)
    mask = torch.rand(n, generator=g) > 0.3
    return hs, ws, ht, wt, mask


def grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def naive(hs, ws, ht, wt, *, mask=None, temperature=1.0, student_divisor=1.0, teacher_divisor=1.0, normalizer=None):
    return naive_forward_kl(
        hs @ ws.T / student_divisor,
        ht @ wt.T / teacher_divisor,
        mask=mask,
        temperature=temperature,
        normalizer=normalizer,
    )


# ---------------------------------------------------------------------------------------------------
# forward KL: chunked == naive
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 7, 29, 1024])  # 1 row, not dividing N=29, exactly N, larger than N
@pytest.mark.parametrize("vocab", [5, 257])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_chunked_equals_naive(chunk_size, vocab, temperature):
    hs, ws, ht, wt, mask = make(vocab=vocab, seed=vocab)
    chunked = forward_kl(hs, ws, ht, wt, mask=mask, temperature=temperature, chunk_size=chunk_size)
    reference = naive(hs, ws, ht, wt, mask=mask, temperature=temperature)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(chunked, hs, ws), grads(reference, hs, ws)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    assert chunked.dtype == torch.float32 and chunked.item() > 0


def test_without_mask_is_mean_over_all_tokens():
    hs, ws, ht, wt, _ = make()
    chunked = forward_kl(hs, ws, ht, wt, chunk_size=8)
    per_token = [naive(hs[i : i + 1], ws, ht[i : i + 1], wt) for i in range(hs.shape[0])]
    torch.testing.assert_close(chunked, torch.stack(per_token).mean(), rtol=1e-5, atol=1e-6)


def test_batched_shapes_are_flattened():
    hs, ws, ht, wt, mask = make(n=24)
    flat = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=5)
    batched = forward_kl(hs.view(4, 6, -1), ws, ht.view(4, 6, -1), wt, mask=mask.view(4, 6), chunk_size=5)
    torch.testing.assert_close(batched, flat)


def test_identical_models_give_zero_kl_and_zero_gradient():
    hs, ws, _, _, mask = make()
    loss = forward_kl(hs, ws, hs.detach(), ws.detach(), mask=mask, chunk_size=4)
    assert abs(loss.item()) < 1e-6
    for g in grads(loss, hs, ws):
        assert g.abs().max().item() < 1e-6


# ---------------------------------------------------------------------------------------------------
# masking and normalisation
# ---------------------------------------------------------------------------------------------------


def test_ignored_tokens_contribute_nothing_even_if_non_finite():
    hs, ws, ht, wt, mask = make()
    clean = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=6)
    poisoned_s, poisoned_t = hs.detach().clone(), ht.clone()
    poisoned_s[~mask], poisoned_t[~mask] = float("nan"), float("inf")  # padding rows may hold anything
    poisoned_s.requires_grad_()
    dirty = forward_kl(poisoned_s, ws, poisoned_t, wt, mask=mask, chunk_size=6)
    torch.testing.assert_close(dirty, clean)
    g_hidden, g_head = grads(dirty, poisoned_s, ws)
    assert torch.isfinite(g_head).all()
    assert (g_hidden[~mask] == 0).all() and g_hidden[mask].abs().sum() > 0


def test_all_tokens_ignored_gives_zero_loss_and_zero_gradients():
    hs, ws, ht, wt, _ = make()
    nothing = torch.zeros(hs.shape[0], dtype=torch.bool)
    loss = forward_kl(hs, ws, ht, wt, mask=nothing, temperature=2.0, chunk_size=4)
    assert loss.item() == 0.0
    for g in grads(loss, hs, ws):
        assert torch.isfinite(g).all() and (g == 0).all()
    lm = lm_loss(hs, ws, torch.full((hs.shape[0],), -100), chunk_size=4)
    assert lm.item() == 0.0
    for g in grads(lm, hs, ws):
        assert (g == 0).all()
    # the reference agrees: 0, not NaN
    assert naive(hs, ws, ht, wt, mask=nothing).item() == 0.0


def test_global_normalizer_makes_split_batches_equal_the_whole():
    """Two micro-batches (or two processes) with the global valid-token count == one big batch."""
    hs, ws, ht, wt, mask = make(n=30)
    whole = forward_kl(hs, ws, ht, wt, mask=mask, temperature=2.0, chunk_size=7)
    g_whole = grads(whole, hs, ws)

    total_valid = int(mask.sum())
    halves = [slice(0, 13), slice(13, 30)]  # unequal valid counts, so a per-half mean would differ
    parts = [
        forward_kl(hs[s], ws, ht[s], wt, mask=mask[s], temperature=2.0, chunk_size=7, normalizer=total_valid)
        for s in halves
    ]
    summed = parts[0] + parts[1]
    torch.testing.assert_close(summed, whole)
    for got, want in zip(grads(summed, hs, ws), g_whole):
        torch.testing.assert_close(got, want)
    # without the global normaliser, the mean of per-half means is not the whole-batch mean
    means = [forward_kl(hs[s], ws, ht[s], wt, mask=mask[s], temperature=2.0) for s in halves]
    assert not torch.allclose((means[0] + means[1]) / 2, whole)
    # a tensor normaliser (what an all-reduce gives) behaves the same
    tensor_norm = forward_kl(hs, ws, ht, wt, mask=mask, temperature=2.0, normalizer=torch.tensor(float(total_valid)))
    torch.testing.assert_close(tensor_norm, whole)


# ---------------------------------------------------------------------------------------------------
# temperature, divisors, dtypes
# ---------------------------------------------------------------------------------------------------


def test_temperature_squared_scaling_on_a_hand_computed_case():
    # one token, vocab 2: student logits (0, 0), teacher logits (ln 3, 0)
    hs = torch.zeros(1, 2, requires_grad=True)
    ws = torch.eye(2, requires_grad=True)
    ht, wt = torch.tensor([[math.log(3.0), 0.0]]), torch.eye(2)
    for temperature in (1.0, 2.0, 4.0):
        pt = torch.softmax(ht[0] / temperature, dim=-1)
        kl = float((pt * (pt.log() - math.log(0.5))).sum())
        loss = forward_kl(hs, ws, ht, wt, temperature=temperature)
        assert loss.item() == pytest.approx(temperature**2 * kl, rel=1e-5)
        # gradient w.r.t. the student logits (= hidden, head is I): T² · (p_s − p_t) / T
        (g_hidden,) = grads(loss, hs)
        torch.testing.assert_close(g_hidden[0], temperature * (torch.tensor([0.5, 0.5]) - pt))


def test_logit_divisors_are_applied():
    hs, ws, ht, wt, mask = make()
    loss = forward_kl(hs, ws, ht, wt, mask=mask, student_divisor=4.0, teacher_divisor=0.5, chunk_size=6)
    reference = naive(hs, ws, ht, wt, mask=mask, student_divisor=4.0, teacher_divisor=0.5)
    torch.testing.assert_close(loss, reference)
    for got, want in zip(grads(loss, hs, ws), grads(reference, hs, ws)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
    undivided = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=6)
    assert not torch.allclose(loss, undivided)


def test_fused_loss_matches_the_models_own_logits(family_name):
    """output_head + the family's divisor reproduce model(...).logits for every family (Granite: /8)."""
    torch.manual_seed(0)
    student, teacher = tiny_model(family_name), tiny_model(family_name)
    ids = torch.randint(0, student.config.vocab_size, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        teacher_hidden = teacher.model(ids).last_hidden_state
        teacher_logits = teacher(ids).logits
    student_hidden = student.model(ids).last_hidden_state
    s_head, s_div = output_head(student)
    t_head, t_div = output_head(teacher)
    assert s_div == (8.0 if family_name.startswith("granite") else 1.0)
    fused = forward_kl(student_hidden, s_head, teacher_hidden, t_head, mask=mask,
                       student_divisor=s_div, teacher_divisor=t_div, chunk_size=5)  # fmt: skip
    reference = naive_forward_kl(student(ids).logits, teacher_logits, mask=mask)
    torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)
    fused_grad = torch.autograd.grad(fused, s_head)[0]
    reference_grad = torch.autograd.grad(reference, s_head)[0]
    torch.testing.assert_close(fused_grad, reference_grad, rtol=1e-4, atol=1e-7)


def test_bf16_inputs_are_computed_in_float32_after_the_matmul():
    hs, ws, ht, wt, mask = make(n=40, d=32, dt=48, vocab=300, dtype=torch.bfloat16)
    loss = forward_kl(hs, ws, ht, wt, mask=mask, temperature=2.0, chunk_size=16)
    assert loss.dtype == torch.float32
    # same bf16 products, then float32: the chunked loss matches the naive one tightly ...
    reference = naive(hs, ws, ht, wt, mask=mask, temperature=2.0)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    g_hidden, g_head = grads(loss, hs, ws)
    assert g_hidden.dtype == g_head.dtype == torch.bfloat16
    for got, want in zip((g_hidden, g_head), grads(reference, hs, ws)):
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=1e-4)
    # ... and a float32 computation from the same values within bf16 rounding
    f32 = [t.detach().float().requires_grad_() for t in (hs, ws)]
    exact = forward_kl(f32[0], f32[1], ht.float(), wt.float(), mask=mask, temperature=2.0)
    assert loss.item() == pytest.approx(exact.item(), rel=2e-2)


def test_autocast_runs_the_products_in_the_autocast_dtype():
    hs, ws, ht, wt, mask = make()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=8)
    reference = naive(*(t.bfloat16() for t in (hs, ws, ht, wt)), mask=mask)
    torch.testing.assert_close(loss, reference, rtol=1e-5, atol=1e-6)
    g_hidden, g_head = grads(loss, hs, ws)
    assert g_hidden.dtype == g_head.dtype == torch.float32  # flows back through the casts


# ---------------------------------------------------------------------------------------------------
# memory behaviour and the no-grad path
# ---------------------------------------------------------------------------------------------------


def test_nothing_of_size_tokens_by_vocab_is_saved_for_backward():
    n, d, vocab = 64, 8, 512  # n × vocab is 8× larger than any hidden-sized tensor
    hs, ws, ht, wt, mask = make(n=n, d=d, dt=d, vocab=vocab)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=16)
    assert saved and max(saved) <= max(n, vocab) * d < n * vocab
    naive_saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: naive_saved.append(t.numel()) or t, lambda t: t):
        naive(hs, ws, ht, wt, mask=mask)
    assert max(naive_saved) >= n * vocab  # the reference does hold full logits: the test can tell
    loss.backward()


def test_no_grad_gives_the_same_value_without_a_graph():
    hs, ws, ht, wt, mask = make()
    with_grad = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=5)
    with torch.no_grad():
        without = forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=5)
    assert without.grad_fn is None
    torch.testing.assert_close(without, with_grad.detach())


def test_only_the_head_or_only_the_hidden_may_need_a_gradient():
    hs, ws, ht, wt, mask = make()
    full = grads(forward_kl(hs, ws, ht, wt, mask=mask, chunk_size=5), hs, ws)
    (g_head,) = grads(forward_kl(hs.detach(), ws, ht, wt, mask=mask, chunk_size=5), ws)
    (g_hidden,) = grads(forward_kl(hs, ws.detach(), ht, wt, mask=mask, chunk_size=5), hs)
    torch.testing.assert_close(g_hidden, full[0])
    torch.testing.assert_close(g_head, full[1])


def test_bad_arguments_are_refused():
    hs, ws, ht, wt, mask = make()
    with pytest.raises(ValueError, match="chunk_size"):
        forward_kl(hs, ws, ht, wt, chunk_size=0)
    with pytest.raises(ValueError, match="temperature"):
        forward_kl(hs, ws, ht, wt, temperature=0.0)
    with pytest.raises(ValueError, match="vocabularies differ"):
        forward_kl(hs, ws, ht, wt[:-1])
    with pytest.raises(ValueError, match="mask"):
        forward_kl(hs, ws, ht, wt, mask=mask[:-1])


# ---------------------------------------------------------------------------------------------------
# LM loss
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 6, 1024])
@pytest.mark.parametrize("divisor", [1.0, 8.0])
def test_lm_loss_equals_cross_entropy(chunk_size, divisor):
    hs, ws, _, _, mask = make(vocab=97)
    labels = torch.randint(0, 97, (hs.shape[0],), generator=torch.Generator().manual_seed(1))
    labels[~mask] = -100
    chunked = lm_loss(hs, ws, labels, divisor=divisor, chunk_size=chunk_size)
    reference = F.cross_entropy(hs @ ws.T / divisor, labels, ignore_index=-100)
    torch.testing.assert_close(chunked, reference, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads(chunked, hs, ws), grads(reference, hs, ws)):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_lm_loss_global_normalizer():
    hs, ws, _, _, mask = make(n=30, vocab=40)
    labels = torch.randint(0, 40, (30,), generator=torch.Generator().manual_seed(2))
    labels[~mask] = -100
    whole = lm_loss(hs, ws, labels, chunk_size=4)
    n = int(mask.sum())
    parts = lm_loss(hs[:11], ws, labels[:11], normalizer=n) + lm_loss(hs[11:], ws, labels[11:], normalizer=n)
    torch.testing.assert_close(parts, whole)


# ---------------------------------------------------------------------------------------------------
# hidden-state losses and the dynamic weighting
# ---------------------------------------------------------------------------------------------------


def test_hidden_state_losses():
    g = torch.Generator().manual_seed(3)
    teacher = torch.randn(2, 5, 16, generator=g)
    same = HiddenStateLoss(16, 16, "cosine")
    assert isinstance(same.proj, torch.nn.Identity)
    assert same(teacher * 3.0, teacher).item() == pytest.approx(0.0, abs=1e-6)  # cosine ignores scale
    assert same(-teacher, teacher).item() == pytest.approx(2.0, abs=1e-6)

    student = torch.randn(2, 5, 16, generator=g)
    mse = HiddenStateLoss(16, 16, "mse")
    torch.testing.assert_close(mse(student, teacher), F.mse_loss(student, teacher))
    mask = torch.zeros(2, 5, dtype=torch.bool)
    mask[0, :2] = True
    torch.testing.assert_close(mse(student, teacher, mask=mask), F.mse_loss(student[0, :2], teacher[0, :2]))
    assert mse(student, teacher, mask=torch.zeros_like(mask)).item() == 0.0


def test_hidden_state_projection_is_trained_when_widths_differ():
    torch.manual_seed(0)
    loss_fn = HiddenStateLoss(8, 16, "cosine")
    assert loss_fn.proj.weight.shape == (16, 8)
    student = torch.randn(10, 8, requires_grad=True)
    teacher = torch.randn(10, 16)
    loss_fn(student, teacher).backward()
    assert loss_fn.proj.weight.grad.abs().sum() > 0 and student.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="kind"):
        HiddenStateLoss(8, 16, "l1")


def test_dynamic_weighting_matches_the_logit_loss_magnitude():
    w = torch.tensor([2.0], requires_grad=True)
    kd = (w * 3.0).sum()  # 6
    hidden = [(w * 0.5).sum(), (w * 1.5).sum()]  # mean 2
    lm = (w * 1.0).sum()
    out = combine_losses(kd, lm=lm, hidden=hidden, kd_weight=1.0, lm_weight=0.5)
    assert out["alpha"].item() == pytest.approx(3.0)
    assert out["total"].item() == pytest.approx(6.0 + 0.5 * 2.0 + 3.0 * 2.0)
    (g,) = torch.autograd.grad(out["total"], w)
    # α is a constant for autograd: d/dw = 3 + 0.5·1 + α·1
    assert g.item() == pytest.approx(3.0 + 0.5 + 3.0)
    assert set(out) == {"total", "kd", "lm", "hidden", "alpha"}
    only_kd = combine_losses(kd)
    assert set(only_kd) == {"total", "kd"} and only_kd["total"].item() == pytest.approx(6.0)


def test_forward_kl_stays_exact_at_a_llama3_vocabulary():
    # One chunk of 256 tokens × 128,256 entries: summing it with a float32 BLAS dot product drifted by ~0.1 %,
    # which small-vocabulary tests cannot see. Compared with a float64 reference.
    g = torch.Generator().manual_seed(0)
    n, v = 256, 128_256
    hs, ws = torch.randn(n, 64, generator=g), torch.randn(v, 64, generator=g) * 3 / 8
    ht, wt = torch.randn(n, 96, generator=g), torch.randn(v, 96, generator=g) * 3 / 96**0.5
    exact = naive_forward_kl(hs.double() @ ws.double().T, ht.double() @ wt.double().T).item()
    for chunk in (64, 256):
        got = forward_kl(hs, ws, ht, wt, chunk_size=chunk).item()
        assert abs(got - exact) < 2e-6 * exact, (chunk, got, exact)


# --- which hidden states a pair names -------------------------------------------------------------------------


def test_layer_outputs_are_every_layers_raw_output_the_last_included(family_name):
    """transformers 5's last ``hidden_states`` entry is the final norm's output; ``layer_outputs`` gives the
    last decoder layer's own output there, so every index means the same thing: the state after layer i."""
    model = tiny_model(family_name)
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    raw = []
    hooks = [layer.register_forward_hook(lambda m, a, out: raw.append(out[0] if isinstance(out, tuple) else out))
             for layer in model.model.layers]  # fmt: skip
    with torch.no_grad():
        out, states = layer_outputs(model.model, True, input_ids=ids)
    for hook in hooks:
        hook.remove()
    assert len(states) == len(raw) + 1 == model.config.num_hidden_layers + 1
    assert torch.equal(states[0], model.model.embed_tokens(ids) * getattr(model.config, "embedding_multiplier", 1.0))
    assert all(torch.equal(states[i + 1], raw[i]) for i in range(len(raw)))
    torch.testing.assert_close(model.model.norm(states[-1]), out.last_hidden_state)
    assert all(hook.__name__ != "catch" for hook in model.model.layers[-1]._forward_hooks.values())  # this call's only


def test_a_pair_naming_the_last_layer_compares_like_with_like(tmp_path):
    """A student that *is* the teacher's first two layers: its last layer's output and the teacher's layer-2
    output are the same residual stream, so the hidden-state loss of the pair [2, 2] is exactly zero."""
    from minitron.distill import Distiller
    from minitron.recipe import load_recipe

    teacher = tiny_model("llama")
    student = copy.deepcopy(teacher)
    student.model.layers = student.model.layers[:2]
    student.config.num_hidden_layers = 2
    recipe = load_recipe(RECIPES / "tiny-cpu.yaml", ["loss.hidden.pairs=[[2, 2], [1, 1]]", "loss.hidden.kind=mse"])
    distiller = Distiller(student, teacher, recipe).train()
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    out = distiller(ids, normalizer=float(ids[:, 1:].numel()), with_lm=False)
    assert out["hidden"] == 0 and out["kd"] > 0  # the logits differ (two layers fewer), the paired states do not

"""On a CUDA GPU: the paths that only a GPU exercises (bf16 autocast, CUDA kernels of the fused loss, the
importance hooks on device, a sharded FSDP2 step) give what their CPU / float32 references give.

Marked ``gpu``: skipped without CUDA, except in the GPU suite's CPU rehearsal (``MINITRON_GPU_TESTS=cpu``,
``benchmarks/gpu/run.sh --device cpu --small``), where the same code runs on the CPU so that it cannot rot.
"""

import socket

import pytest
import torch
import torch.distributed as dist
from tiny import tiny_model

from minitron.distill import Distiller, make_optimizer, shard, train_step
from minitron.distill_data import World
from minitron.importance import compute_scores
from minitron.losses import forward_kl, naive_forward_kl
from minitron.recipe import validate

pytestmark = pytest.mark.gpu
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def recipe(precision: str):
    return validate({
        "teacher": {"path": "tiny"}, "student": {"path": "tiny"}, "data": {"source": "random.txt", "seq_len": 33},
        "loss": {"kd": 1.0, "lm": 0.5, "chunk_size": 16},
        "optimizer": {"lr": 1e-3, "min_lr": 1e-3, "schedule": "constant", "grad_clip": 1.0},
        "batch": {"micro": 2, "global": 2}, "budget": {"steps": 10}, "precision": precision, "output": {"dir": "unused"},
    })  # fmt: skip


def pair(precision: str) -> Distiller:
    """A tiny Llama teacher (bf16 when training in bf16, as ``load_models`` does) and a float32 student."""
    teacher = tiny_model("llama", seed=0).to(torch.bfloat16 if precision == "bf16" else torch.float32)
    student = tiny_model("llama", seed=1, num_hidden_layers=2)
    return Distiller(student, teacher, recipe(precision)).to(DEVICE).train()


def batch(vocab: int = 128, rows: int = 2, seq: int = 33) -> torch.Tensor:
    return torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(0))


def student_grads(model: Distiller) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.student.parameters() if p.grad is not None])


# --- bf16 autocast vs the float32 reference ---------------------------------------------------------------------


def test_bf16_autocast_step_tracks_the_float32_reference():
    world = World(rank=0, size=1, device=DEVICE)
    ids = batch()
    runs = {}
    for precision in ("fp32", "bf16"):
        model = pair(precision)
        optimizer, _ = make_optimizer(model, recipe(precision).optimizer, 10)
        stats = train_step(model, optimizer, [ids], recipe(precision), world)
        runs[precision] = (stats, student_grads(model), model)
        optimizer.step()
        # Master weights, their gradients and the optimizer state stay float32 under autocast.
        assert all(p.dtype == torch.float32 for p in model.student.parameters())
        assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer.state.values())
    (ref, g_ref, _), (bf16, g_bf16, _) = runs["fp32"], runs["bf16"]
    # bf16 matmuls really ran (the losses differ), and stay within bf16's rounding of the reference.
    assert bf16["loss"] != ref["loss"]
    assert abs(bf16["loss"] - ref["loss"]) / abs(ref["loss"]) < 2e-2
    cosine = torch.nn.functional.cosine_similarity(g_ref, g_bf16, dim=0)
    assert cosine > 0.99, f"bf16 gradient direction {cosine:.4f} off the float32 one"
    assert torch.isfinite(g_bf16).all()


# --- the fused, chunked KD loss on the device -------------------------------------------------------------------


def kd_inputs(n: int, vocab: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hs = torch.randn(n, 48, generator=g).to(DEVICE, dtype).requires_grad_()
    ws = (torch.randn(vocab, 48, generator=g) * 0.4).to(DEVICE, dtype).requires_grad_()
    ht = torch.randn(n, 64, generator=g).to(DEVICE, dtype)
    wt = (torch.randn(vocab, 64, generator=g) * 0.4).to(DEVICE, dtype)
    return hs, ws, ht, wt


def test_chunked_kd_loss_equals_the_naive_loss_values_and_gradients():
    hs, ws, ht, wt = kd_inputs(300, 1000)  # 300 tokens: chunks of 64 leave a remainder
    chunked = forward_kl(hs, ws, ht, wt, temperature=2.0, chunk_size=64)
    chunked.backward()
    grads = hs.grad.clone(), ws.grad.clone()
    hs.grad = ws.grad = None
    naive = naive_forward_kl(hs @ ws.T, (ht @ wt.T).detach(), temperature=2.0)
    naive.backward()
    torch.testing.assert_close(chunked, naive, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grads[0], hs.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(grads[1], ws.grad, rtol=1e-4, atol=1e-6)


def test_chunked_kd_loss_in_bf16_stays_near_float32_and_never_holds_full_logits():
    n, vocab = 2048, 4096
    hs, ws, ht, wt = kd_inputs(n, vocab, torch.bfloat16)
    reference = naive_forward_kl((hs.float() @ ws.float().T), ht.float() @ wt.float().T)
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    loss = forward_kl(hs, ws, ht, wt, chunk_size=256)
    loss.backward()
    assert abs(loss.item() - reference.item()) / reference.item() < 2e-2
    assert torch.isfinite(hs.grad.float()).all() and torch.isfinite(ws.grad.float()).all()
    if DEVICE.type == "cuda":  # the point of chunking: far less than one N × V float32 logits tensor
        extra = torch.cuda.max_memory_allocated() - before
        assert extra < n * vocab * 4 / 2, f"chunked loss took {extra / 2**20:.1f} MiB"


# --- importance on the device == on the CPU ---------------------------------------------------------------------


def test_importance_on_the_device_equals_the_cpu():
    model = tiny_model("llama", seed=3)
    blocks = batch(rows=4, seq=32)
    on_cpu = compute_scores(model, blocks, batch_size=2, layer_loss=True, show_progress=False)
    on_device = compute_scores(model.to(DEVICE), blocks, batch_size=2, layer_loss=True, show_progress=False)
    assert set(on_cpu.tensors) == set(on_device.tensors)
    for name, value in on_cpu.tensors.items():
        torch.testing.assert_close(on_device.tensors[name].cpu(), value, rtol=1e-4, atol=1e-5, msg=name)


# --- one process, sharded with FSDP2 == unsharded ---------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_one_process_fsdp2_step_equals_the_plain_step():
    dist.init_process_group(
        "nccl" if DEVICE.type == "cuda" else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1
    )
    try:
        world = World(rank=0, size=1, device=DEVICE)
        ids = batch()
        plain, sharded = pair("fp32"), shard(pair("fp32"), "fp32")
        results = []
        for model in (plain, sharded):
            optimizer, _ = make_optimizer(model, recipe("fp32").optimizer, 10)
            stats = [train_step(model, optimizer, [ids], recipe("fp32"), world)]
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            stats.append(train_step(model, optimizer, [ids], recipe("fp32"), world))
            weights = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu()
                       for n, p in model.student.named_parameters()}  # fmt: skip
            results.append((stats, weights))
        (s_plain, w_plain), (s_sharded, w_sharded) = results
        assert any(hasattr(p, "full_tensor") for p in sharded.student.parameters())  # it really is sharded
        for a, b in zip(s_plain, s_sharded):
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        for name, value in w_plain.items():
            torch.testing.assert_close(w_sharded[name], value, rtol=1e-5, atol=1e-6, msg=name)
    finally:
        dist.destroy_process_group()


# --- --search-steps on a half-precision candidate: float32 master weights -----------------------------------------


def test_short_distillation_of_a_bf16_candidate_on_the_device_moves_every_weight():
    """A GPU search prunes candidates in the teacher's bf16; at the search learning rate an AdamW step on bf16
    weights rounds away (norm weights near 1 have an ulp of 2⁻⁷). ``short_distill`` steps float32 masters
    under bf16 autocast: every tensor moves, along the float32 run's update."""
    import copy

    from minitron.search_scoring import short_distill

    teacher = tiny_model("llama", initializer_range=0.3).to(DEVICE, torch.bfloat16)
    student = tiny_model("llama", seed=1, initializer_range=0.3, num_hidden_layers=2).to(DEVICE, torch.bfloat16)
    start = {name: p.detach().float().clone() for name, p in student.named_parameters()}
    reference, teacher32 = copy.deepcopy(student).float(), copy.deepcopy(teacher).float()
    ids = batch(rows=8, seq=16)
    short_distill(student, teacher, ids, steps=3, lr=1e-4, batch_size=4, seed=0)
    short_distill(reference, teacher32, ids, steps=3, lr=1e-4, batch_size=4, seed=0)
    assert all(p.dtype == torch.float32 and p.device.type == DEVICE.type for p in student.parameters())
    trained = dict(reference.named_parameters())
    for name, p in student.named_parameters():
        moved, expected = p.detach() - start[name], trained[name].detach() - start[name]
        # Norm weights near 1 are what bf16 steps froze: every one moves. Elsewhere, rows of tokens absent from
        # the training tokens get no gradient, and a float32 weight whose gradient is tiny can still round its
        # 1e-4-scaled update away: nearly all move.
        share = (moved != 0).float().mean().item()
        assert share == 1.0 if "norm" in name else share > (0.1 if "embed" in name else 0.99), (name, share)
        assert torch.nn.functional.cosine_similarity(moved.flatten(), expected.flatten(), dim=0) > 0.9, name

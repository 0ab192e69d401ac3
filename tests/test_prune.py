"""Applying plans: each axis against the invariant that must hold, streamed == in memory, bounded memory.

The invariants, tested on a tiny random model of every family (the reference is always the *teacher*,
changed as stated, never a second implementation of the pruned model):

* keep everything: the student's logits equal the teacher's exactly.
* query heads / KV groups: removing heads == zeroing the ``o_proj`` input columns of those heads (whole
  groups: of all their query heads). A head reaches the residual stream only through its ``o_proj`` columns.
* MLP neurons (dense, and per expert): removing neurons == zeroing their ``down_proj`` columns. For MoE the
  routing is untouched, since the router reads the layer input, not the experts.
* experts: removing experts == the teacher whose router can never pick them, i.e. their router logits set
  to −inf before the top-k and its softmax. Zeroing an expert's weights is *not* equivalent: it would still
  be picked and take softmax weight from the kept ones. With ``--top-k k'`` ≤ kept experts, the masked
  teacher with its own top-k gives −inf logits zero weight, so it equals the student with top-k k' whenever
  k' equals the kept count (tested with 1 expert, top-1).
* layers: dropping a layer == skipping it in the teacher's forward (its output replaced by its input).
* embedding channels (RMSNorm): RMSNorm divides by the mean square over *all* D channels, so zeroing channels
  is not removing them. If the dropped channels S are zero in the embedding and in every writer to the residual
  stream (``o_proj`` rows and bias, ``down_proj`` rows and bias, the experts' output rows), they stay zero,
  and each norm sees ``w·h/√(Σh²/D + ε)`` in the teacher, ``w'·h/√(Σh²/D' + ε')`` in the student
  (``D' = D − |S|``, same sum). These are equal for every ``h`` iff ``w' = w·√(D/D')`` and ``ε' = ε·D/D'``.
  So: teacher with S zeroed == student whose norm weights are scaled by √(D/D') and epsilons by D/D'
  (and, checked too, ≠ the student without that rescaling). Qwen3's q/k norms act over head_dim, which
  pruning never changes: they are neither cut nor rescaled.
* embedding channels (LayerNorm, Nemotron's LayerNorm1P with bias): a LayerNorm also subtracts the mean over
  all D channels, so no rescaling makes zeroing equal removing. Its reference is the teacher whose norms
  compute their statistics over the kept channels only (and output 0 on the others), with the dropped
  channels zeroed in the embedding and every residual writer: then the student, whose norms' weights and
  biases are the kept slices, is equal to it without any rescaling.
"""

import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from clirun import minitron
from safetensors import safe_open
from safetensors.torch import save_file
from test_plan import random_scores
from tiny import FAMILY_NAMES, save_tiny, tiny_model, tiny_tokenizer

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape, family_of
from minitron.importance import compute_scores
from minitron.plan import identity_plan, make_plan, norm_count, student_shape
from minitron.prune import load_scores, prune_checkpoint, prune_model

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"
IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def teacher_and_plan(name, seed=0, energies=False, **flags):
    """A tiny teacher and a plan from random scores; ``energies``: random ``norm_energy`` too, so the plan
    rescales the norms (RMSNorm families)."""
    model = tiny_model(name)
    teacher = Shape.from_config(model.config)
    drop = flags.pop("drop_layers", None)
    extra = {"norm_energy": torch.rand(norm_count(teacher), teacher.hidden) + 0.1} if energies else {}
    scores = random_scores(teacher, seed, **extra)
    plan = make_plan(teacher, student_shape(teacher, drop_layers=drop, **flags), scores, drop)
    return model, plan


def dropped(kept, size):
    return [i for i in range(size) if i not in kept]


def head_columns(heads, head_dim):
    return [h * head_dim + j for h in heads for j in range(head_dim)]


# --- each axis against its invariant -------------------------------------------------------------------------


def test_identity_plan_reproduces_the_teacher_exactly(family_name):
    model = tiny_model(family_name)
    student = prune_model(model, identity_plan(Shape.from_config(model.config)))
    assert torch.equal(logits(student), logits(model))


@pytest.mark.parametrize("flags", [dict(heads=2), dict(kv_heads=1)], ids=["heads", "kv-groups"])
def test_heads_equal_zeroed_o_proj_columns(family_name, flags):
    model, plan = teacher_and_plan(family_name, **flags)
    student = prune_model(model, plan)
    t = plan.teacher
    with torch.no_grad():
        for layer in plan.layers:
            o_proj = model.model.layers[layer.source].self_attn.o_proj.weight
            o_proj[:, head_columns(dropped(layer.heads, t.heads), t.head_dim)] = 0
    close(logits(student), logits(model))
    assert student.config.num_attention_heads == 2 and student.config.head_dim == t.head_dim


def test_neurons_equal_zeroed_down_proj_columns(family_name):
    model, plan = teacher_and_plan(family_name, **({"expert_ffn": 12} if "moe" in family_name else {"ffn": 40}))
    student = prune_model(model, plan)
    with torch.no_grad():
        for layer in plan.layers:
            block = model.model.layers[layer.source]
            if plan.teacher.experts:
                experts = block.get_submodule(plan.teacher.family.moe).experts
                for e, neurons in zip(layer.experts, layer.neurons):
                    experts.down_proj[e][:, dropped(neurons, plan.teacher.ffn)] = 0
            else:
                block.mlp.down_proj.weight[:, dropped(layer.neurons, plan.teacher.ffn)] = 0
    close(logits(student), logits(model))


def mask_router(router, keep):
    """Make the teacher's router unable to pick experts outside ``keep`` (−inf logits before top-k).

    Both routers' top-k weights are the softmax over all experts restricted to the top k: GraniteMoe's and
    Qwen3-MoE's with ``norm_topk_prob`` renormalised to sum to 1 (the softmax of the top-k logits),
    Qwen3-MoE's without it not (a −inf logit then takes no share of the denominator either)."""
    masked = torch.full((router.weight.shape[0],), float("-inf"))
    masked[keep] = 0.0

    def hook(module, args, output):
        router_logits = output[0] + masked
        top, index = torch.softmax(router_logits.float(), dim=-1).topk(module.top_k, dim=-1)
        if getattr(module, "norm_topk_prob", True):
            top = top / top.sum(dim=-1, keepdim=True)
        return router_logits, top.type_as(args[0]), index

    return router.register_forward_hook(hook)


MOE_NAMES = [name for name in FAMILY_NAMES if FAMILIES[name].is_moe]


@pytest.mark.parametrize("name", MOE_NAMES)
@pytest.mark.parametrize("flags", [dict(experts=3), dict(experts=2, expert_ffn=16), dict(experts=1, top_k=1)])
def test_experts_equal_a_router_that_cannot_pick_them(name, flags):
    model, plan = teacher_and_plan(name, **flags)
    student = prune_model(model, plan)
    family = plan.teacher.family
    for layer in plan.layers:
        block = model.model.layers[layer.source]
        mask_router(block.get_submodule(family.router), layer.experts)
        with torch.no_grad():
            for e, neurons in zip(layer.experts, layer.neurons):
                block.get_submodule(family.moe).experts.down_proj[e][:, dropped(neurons, plan.teacher.ffn)] = 0
    close(logits(student), logits(model))
    assert Shape.from_config(student.config).experts == flags["experts"]
    assert student.config.num_experts_per_tok == flags.get("top_k", 2)
    assert not torch.allclose(logits(student), logits(tiny_model(name)))  # the test is not vacuous


def test_experts_without_renormalised_top_k_weights():
    """Qwen3-MoE with ``norm_topk_prob`` false: the kept experts' weights are shares of the softmax over the
    kept experts, as in the masked teacher."""
    model = tiny_model("qwen3_moe", norm_topk_prob=False)
    teacher = Shape.from_config(model.config)
    plan = make_plan(teacher, student_shape(teacher, experts=3), random_scores(teacher, 1))
    student = prune_model(model, plan)
    for layer in plan.layers:
        router = model.model.layers[layer.source].mlp.gate
        mask_router(router, layer.experts)
    close(logits(student), logits(model))


def test_dropped_layers_equal_skipped_layers(family_name):
    model, plan = teacher_and_plan(family_name, drop_layers=[1, 2])
    student = prune_model(model, plan)
    for i in plan.dropped_layers:
        model.model.layers[i].register_forward_hook(
            lambda module, args, kwargs, output: args[0] if args else kwargs["hidden_states"], with_kwargs=True
        )
    assert torch.equal(logits(student), logits(model))
    assert len(student.model.layers) == 2


def rescale_norms(model, factor):
    """Every RMSNorm over the embedding channels: weight × √factor, ε × factor (see the module docstring).
    Qwen3's per-head q/k norms act over head_dim and stay as they are."""
    hidden = model.config.hidden_size
    norms = [m for m in model.modules() if hasattr(m, "variance_epsilon") and m.weight.shape == (hidden,)]
    with torch.no_grad():
        for norm in norms:
            norm.weight.mul_(math.sqrt(factor))
            norm.variance_epsilon *= factor
    return len(norms)


def zero_dropped_channels(model, plan):
    """Zero the dropped embedding channels in the embedding and in every writer to the residual stream."""
    t = plan.teacher
    gone = torch.tensor(dropped(plan.hidden, t.hidden))
    state = model.state_dict()
    with torch.no_grad():
        state["model.embed_tokens.weight"][:, gone] = 0
        for i in range(t.layers):
            for spec in t.memory_layer_tensors():
                writes_residual = "hidden" in spec.axes and "norm" not in spec.name and (
                    len(spec.axes) == 1 or spec.axes[-1] != "hidden"
                )
                if writes_residual:
                    state[f"model.layers.{i}.{spec.name}"].index_fill_(spec.axes.index("hidden"), gone, 0)


def test_embedding_channels_equal_zeroed_channels_with_rescaled_norms(family_name):
    model, plan = teacher_and_plan(family_name, hidden=40)
    if any(isinstance(m, torch.nn.LayerNorm) for m in model.modules()):
        pytest.skip("a LayerNorm subtracts the mean: see test_embedding_channels_equal_layer_norms_over_kept_channels")
    t = plan.teacher
    zero_dropped_channels(model, plan)
    reference = logits(model)
    student = prune_model(model, plan)
    assert not torch.allclose(logits(student), reference, atol=1e-3)  # removing ≠ zeroing, as RMSNorm sees D
    assert rescale_norms(student, t.hidden / plan.student.hidden) == 2 * t.layers + 1
    close(logits(student), reference)


def test_norm_energies_make_the_pruner_rescale_exactly_that(family_name):
    """The same equivalence with the factor the plan computes from measured ``norm_energy``
    (:func:`minitron.plan.norm_scales`): the dropped channels carry nothing, so ``√(mean kept / mean all)``
    of their mean squares is ``√(D/D')``, and the student needs no hand rescaling (to make the
    result exact, ε = 0 here, since the pruner cannot scale it: it is one config field for all norms. On
    these tiny random models it is a few percent of the mean square; on trained ones, far less). LayerNorm families
    get no factor."""
    model = tiny_model(family_name, rms_norm_eps=0.0)
    teacher = Shape.from_config(model.config)
    plan = make_plan(teacher, student_shape(teacher, hidden=40), random_scores(teacher))
    zero_dropped_channels(model, plan)
    reference = logits(model)
    scores = compute_scores(model, IDS, batch_size=2, show_progress=False)
    measured = make_plan(plan.teacher, plan.student, scores)
    assert measured.hidden == plan.hidden  # the zeroed channels score 0, so they are the ones removed
    student = prune_model(model, measured)
    if not plan.teacher.family.rms_norms:
        assert measured.norm_scale == []
        return
    factor = (plan.teacher.hidden / plan.student.hidden) ** 0.5
    torch.testing.assert_close(torch.tensor(measured.norm_scale), torch.full((norm_count(plan.teacher),), factor))
    close(logits(student), reference)
    assert not torch.allclose(logits(prune_model(model, plan)), reference, atol=1e-3)  # the same cut, no factor


def test_embedding_channels_equal_layer_norms_over_kept_channels():
    """Nemotron (LayerNorm1P: weight + 1, with bias); see the module docstring."""
    model, plan = teacher_and_plan("nemotron", hidden=40)
    kept = torch.tensor(plan.hidden)
    zero_dropped_channels(model, plan)
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 2 * plan.teacher.layers + 1 and all(norm.bias is not None for norm in norms)
    reference_before = logits(model)

    def over_kept(module, args, output):
        x = args[0]
        out = torch.zeros_like(output)
        weight, bias = (module.weight + 1.0)[kept], module.bias[kept]  # LayerNorm1P scales by 1 + weight
        out[..., kept] = torch.nn.functional.layer_norm(x[..., kept], (len(kept),), weight, bias, module.eps)
        return out

    for norm in norms:
        norm.register_forward_hook(over_kept)
    reference = logits(model)
    student = prune_model(model, plan)
    assert not torch.allclose(reference, reference_before, atol=1e-3)  # the reference is not the plain teacher
    close(logits(student), reference)


def test_qwen3_q_and_k_norms_act_over_head_dim_which_pruning_keeps():
    """q_norm / k_norm normalise each head over its head_dim channels, with one weight shared by all heads.
    Pruning removes whole heads and embedding channels and never changes head_dim, so they are copied
    whole, unscaled: the equivalences above (heads, KV groups, embedding channels) hold with them as they are."""
    model, plan = teacher_and_plan("qwen3", hidden=40, heads=2, kv_heads=1)
    student = prune_model(model, plan)
    assert student.config.head_dim == plan.teacher.head_dim
    for new, layer in enumerate(plan.layers):
        for name in ("q_norm", "k_norm"):
            teacher_norm = model.model.layers[layer.source].self_attn.get_submodule(name)
            student_norm = student.model.layers[new].self_attn.get_submodule(name)
            assert student_norm.weight.shape == (plan.teacher.head_dim,)
            assert torch.equal(student_norm.weight, teacher_norm.weight)
            assert student_norm.variance_epsilon == teacher_norm.variance_epsilon


def test_a_plan_for_another_model_is_refused():
    plan = identity_plan(Shape.from_config(tiny_model("llama", hidden_size=32).config))
    with pytest.raises(UserError, match="another shape"):
        prune_model(tiny_model("llama"), plan)


# --- streamed checkpoints -----------------------------------------------------------------------------------


def read_all(folder):
    tensors = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        with safe_open(path, "pt") as f:
            tensors.update({k: f.get_tensor(k) for k in f.keys()})
    return tensors


def shrink_everything(name):
    flags = dict(hidden=48, heads=2, kv_heads=1, drop_layers=[2])
    flags.update(dict(experts=3, expert_ffn=16) if "moe" in name else dict(ffn=64))
    return flags


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_streamed_is_byte_identical_to_in_memory(tmp_path, family_name, dtype):
    """The streamed student is what save_pretrained writes for the in-memory student: transformers' own
    in-memory → on-disk conversion is the reference for the per-expert names (Qwen3-MoE)."""
    if dtype == torch.bfloat16 and family_name not in ("llama", "granitemoe", "qwen3_moe"):
        pytest.skip("bf16 once per kind of model is enough")
    model, plan = teacher_and_plan(family_name, energies=True, **shrink_everything(family_name))
    assert bool(plan.norm_scale) == plan.teacher.family.rms_norms
    model = model.to(dtype)
    model.save_pretrained(tmp_path / "teacher", max_shard_size="40KB")
    assert len(list((tmp_path / "teacher").glob("*.safetensors"))) > 1
    out = prune_checkpoint(tmp_path / "teacher", plan, tmp_path / "student", max_shard_bytes=30_000)
    assert len(list(out.glob("*.safetensors"))) > 1 and (out / "model.safetensors.index.json").is_file()
    index = json.loads((out / "model.safetensors.index.json").read_text())

    on_disk = read_all(out)
    assert set(index["weight_map"]) == set(on_disk)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    prune_model(model, plan).save_pretrained(tmp_path / "in-memory")
    in_memory = read_all(tmp_path / "in-memory")
    if plan.teacher.tied:
        in_memory.pop("lm_head.weight", None)  # the teacher wrote no tied head, so neither does the student
    assert set(on_disk) == set(in_memory)
    for name, tensor in on_disk.items():
        assert tensor.dtype == dtype == in_memory[name].dtype, name
        assert torch.equal(tensor.view(-1).view(torch.uint8), in_memory[name].contiguous().view(-1).view(torch.uint8))


@pytest.mark.parametrize("name", MOE_NAMES)
def test_a_checkpoint_in_the_in_memory_layout_prunes_to_the_same_layout(tmp_path, name):
    """transformers loads fused expert tensors under their in-memory names too (a checkpoint written from a
    state_dict); the streamed pruner reads that layout and writes the student in it."""
    from transformers import AutoModelForCausalLM

    model, plan = teacher_and_plan(name, **shrink_everything(name))
    (tmp_path / "teacher").mkdir()
    model.config.save_pretrained(tmp_path / "teacher")
    tied_head = {"lm_head.weight"} if plan.teacher.tied else set()
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in tied_head}
    save_file(state, tmp_path / "teacher" / "model.safetensors", metadata={"format": "pt"})
    out = prune_checkpoint(tmp_path / "teacher", plan, tmp_path / "student")
    expected = prune_model(model, plan).state_dict()
    on_disk = read_all(out)
    assert any(".experts.down_proj" in k for k in on_disk)  # fused, as read
    assert set(on_disk) == set(expected) - ({"lm_head.weight"} if plan.teacher.tied else set())
    assert all(torch.equal(on_disk[k], expected[k]) for k in on_disk)
    loaded = AutoModelForCausalLM.from_pretrained(out).eval()
    assert torch.equal(logits(loaded), logits(prune_model(model, plan)))


def test_checkpoint_loads_and_generates(tmp_path, family_name):
    """Multipliers, tied embeddings, experts and head_dim survive prune → from_pretrained → generate."""
    from transformers import AutoModelForCausalLM

    teacher = save_tiny(family_name, tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    teacher.generation_config.save_pretrained(tmp_path / "teacher")
    flags = shrink_everything(family_name)
    plan = make_plan(Shape.from_config(teacher.config), student_shape(Shape.from_config(teacher.config), **flags),
                     random_scores(Shape.from_config(teacher.config)), flags["drop_layers"])  # fmt: skip
    out = prune_checkpoint(tmp_path / "teacher", plan, tmp_path / "student", command="minitron prune test")

    loaded = AutoModelForCausalLM.from_pretrained(out).eval()  # stock loader, no trust_remote_code
    assert torch.equal(logits(loaded), logits(prune_model(teacher, plan)))
    assert Shape.from_config(loaded.config) == plan.student
    for key in family_of(teacher.config).multipliers:
        assert getattr(loaded.config, key) == getattr(teacher.config, key)
    if plan.teacher.tied:
        assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    # Rotary settings travel unchanged: Nemotron rotates half of each head (head_dim is never pruned).
    assert loaded.config.rope_parameters == teacher.config.rope_parameters
    layer_types = getattr(teacher.config, "layer_types", None)
    if layer_types:
        assert loaded.config.layer_types == [layer_types[i] for i in (0, 1, 3)]
    generated = loaded.generate(IDS[:1, :4], max_new_tokens=5, do_sample=False)
    assert generated.shape == (1, 9)

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "plan.json", "README.md"):
        assert (out / name).is_file(), name
    assert json.loads((out / "config.json").read_text())["head_dim"] == plan.teacher.head_dim
    assert "minitron prune test" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".student*")), "no temporary folder is left behind"


# --- memory: a checkpoint much larger than one tensor ----------------------------------------------------------

_BIG = dict(hidden=1024, ffn=2816, heads=8, kv_heads=4, head_dim=128, layers=12, vocab=8192)


def write_big_checkpoint(folder: Path, shard_bytes: int = 64 * 2**20) -> int:
    """A Llama-shaped float32 checkpoint of random weights, written shard by shard; returns its size."""
    from transformers import LlamaConfig

    c = _BIG
    config = LlamaConfig(hidden_size=c["hidden"], intermediate_size=c["ffn"], num_attention_heads=c["heads"],
                         num_key_value_heads=c["kv_heads"], head_dim=c["head_dim"], num_hidden_layers=c["layers"],
                         vocab_size=c["vocab"])  # fmt: skip
    folder.mkdir()
    config.save_pretrained(folder)
    shape = Shape.from_config(config)
    names = [(spec.name, shape.tensor_shape(spec)) for spec in shape.global_tensors()]
    names += [(f"model.layers.{i}.{s.name}", shape.tensor_shape(s)) for i in range(shape.layers) for s in shape.layer_tensors()]
    # One random block tiled into every tensor: memory and I/O behave as with any weights, and it is written
    # in a fraction of the time that drawing 150M random numbers takes.
    block = torch.rand(2**20, generator=torch.Generator().manual_seed(0))
    shard, used, count, weight_map, total = {}, 0, 0, {}, 0

    def flush():
        nonlocal shard, used, count
        count += 1
        save_file(shard, folder / f"part-{count}.safetensors")
        weight_map.update({k: f"part-{count}.safetensors" for k in shard})
        shard, used = {}, 0

    for name, dims in names:
        shard[name] = block.repeat(math.prod(dims) // block.numel() + 1)[: math.prod(dims)].view(dims)
        used += shard[name].numel() * 4
        total += shard[name].numel() * 4
        if used >= shard_bytes:
            flush()
    if shard:
        flush()
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return total


def test_streamed_peak_memory_is_far_below_the_checkpoint(tmp_path):
    size = write_big_checkpoint(tmp_path / "teacher")
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path.insert(0, {str(Path(__file__).parent)!r})
        from test_plan import random_scores
        from minitron.families import Shape
        from minitron.inputs import read_config
        from minitron.plan import make_plan, student_shape
        from minitron.prune import prune_checkpoint

        teacher = Shape.from_config(read_config({str(tmp_path / "teacher")!r}))
        plan = make_plan(teacher, student_shape(teacher, hidden=768, ffn=2048, heads=4, layers=10), random_scores(teacher))
        def status(field):  # KiB
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith(field))

        # The peak so far includes importing torch (large on CUDA builds): reset it to the current RSS
        # (Linux: "5" into clear_refs), so that the peak read afterwards is the pruning's own.
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = status("VmRSS")
        prune_checkpoint({str(tmp_path / "teacher")!r}, plan, {str(tmp_path / "student")!r},
                         max_shard_bytes=100 * 2**20, show_progress=False)
        print(json.dumps({{"before": before * 1024, "peak": status("VmHWM") * 1024}}))
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    rss = json.loads(result.stdout.strip().splitlines()[-1])
    largest = _BIG["vocab"] * _BIG["hidden"] * 4  # the embedding (and head), 32 MiB
    shard = max(p.stat().st_size for p in (tmp_path / "teacher").glob("*.safetensors"))
    grown = rss["peak"] - rss["before"]
    # Per tensor: its shard is memory-mapped while it is read (the kernel may map the whole freshly written
    # file, and mapped pages count in RSS though they are reclaimable page cache), the cut copy is made and
    # written. So the peak grows by about one shard plus a few tensors, never by the checkpoint.
    assert size > 600 * 2**20 and size > 8 * shard
    assert grown < shard + 3 * largest, (rss, grown, shard, largest)
    assert grown < size / 4
    shapes = {}
    for path in (tmp_path / "student").glob("*.safetensors"):
        with safe_open(path, "pt") as f:
            shapes.update({k: f.get_slice(k).get_shape() for k in f.keys()})
    assert len(shapes) == 3 + 10 * 9 and shapes["model.embed_tokens.weight"] == [8192, 768]


# --- the `minitron prune` verb --------------------------------------------------------------------------------


def cli(*args):
    return minitron("prune", *args, timeout=300)


@pytest.mark.parametrize(
    "teacher, flags, reference, total",
    [
        ("llama-3.1-8b", ["--hidden-size", 3072, "--ffn-size", 9216], "llama-3.1-minitron-4b-width", 4_512_746_496),
        ("llama-3.1-8b", ["--drop-layers", "16-31"], "llama-3.1-minitron-4b-depth", 4_540_469_248),
        # 2407.14679: Minitron-8B keeps all 48 heads; Minitron-4B halves them (in one step here, two in the paper).
        ("nemotron-4-15b-base", ["--hidden-size", 4096, "--ffn-size", 16384], "minitron-8b-base", 8_271_699_968),
        ("nemotron-4-15b-base", ["--hidden-size", 3072, "--ffn-size", 9216, "--heads", 24], "minitron-4b-base",
         4_190_509_056),
    ],
    ids=["llama-width", "llama-depth", "minitron-8b", "minitron-4b"],
)  # fmt: skip
def test_full_size_dry_run_gives_the_published_shapes(tmp_path, teacher, flags, reference, total):
    from minitron.inputs import read_config

    result = cli(SHARED / teacher, *flags, "--dry-run", "--json", "-o", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    expected = Shape.from_config(read_config(SHARED / reference))
    assert info["student"]["shape"] == expected.to_dict()
    assert info["student"]["params"]["total"] == total
    assert info["teacher"]["params"]["total"] == Shape.from_config(read_config(SHARED / teacher)).counts()["total"]
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_table_on_a_config_only_folder():
    result = cli(SHARED / "granite-3.1-1b-a400m-base", "--experts", 16, "--expert-ffn-size", 256, "--dry-run")
    assert result.returncode == 0, result.stderr
    assert "experts" in result.stdout and "params active" in result.stdout


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("checkpoints")
    for name in ("llama", "granitemoe"):
        save_tiny(name, root / name)
    llama = Shape.from_config(tiny_model("llama").config)
    random_scores(llama).save(root / "scores.safetensors")  # as an older minitron wrote them: no norm_energy
    energy = torch.rand(norm_count(llama), llama.hidden) + 0.1
    random_scores(llama, norm_energy=energy).save(root / "scores-energy.safetensors")
    random_scores(Shape.from_config(tiny_model("mistral").config)).save(root / "mistral-scores.safetensors")
    return root


def test_cli_prunes_with_saved_scores(tmp_path, checkpoints):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "student"
    result = cli(checkpoints / "llama", "-o", out, "--hidden-size", 48, "--heads", 2, "--layers", 3,
                 "--scores", checkpoints / "scores.safetensors", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["out"] == str(out) and len(info["dropped_layers"]) == 1
    model = AutoModelForCausalLM.from_pretrained(out)
    assert (model.config.hidden_size, model.config.num_attention_heads, model.config.num_hidden_layers) == (48, 2, 3)
    card = (out / "README.md").read_text()
    assert "--scores" in card and json.loads((out / "plan.json").read_text())["scores"]["sha256"] in card


def test_cli_notes_scores_without_norm_energies_once_checks_pass(tmp_path, checkpoints):
    """Scores from before ``norm_energy``: the prune goes ahead, unrescaled, with one note saying how to get the
    rescaling; none with current scores, none when no embedding channel is cut."""
    old, new = checkpoints / "scores.safetensors", checkpoints / "scores-energy.safetensors"
    for scores, hidden, noted in ((old, 48, True), (new, 48, False), (old, 64, False)):
        out = tmp_path / f"{scores.stem}-{hidden}"
        result = cli(checkpoints / "llama", "-o", out, "--hidden-size", hidden, "--ffn-size", 64, "--scores", scores)
        assert result.returncode == 0, result.stderr
        assert ("note:" in result.stderr and "norm_energy" in result.stderr) == noted, result.stderr
        rescaled = json.loads((out / "plan.json").read_text())["norm_scale"]
        assert len(rescaled) == (norm_count(Shape.from_config(tiny_model("llama").config)) if scores == new else 0)
    out = tmp_path / "refused"
    (out / "x").parent.mkdir()
    (out / "x").write_text("")  # an existing output: refused in one line, the note never printed
    result = cli(checkpoints / "llama", "-o", out, "--hidden-size", 48, "--scores", old)
    assert result.returncode == 2 and "note:" not in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_scores_computed_on_a_model_of_another_name_are_used_with_a_note(tmp_path, checkpoints, capsys):
    from minitron.importance import Scores

    llama = Shape.from_config(tiny_model("llama").config)
    tensors = random_scores(llama).tensors
    for scored, noted in (("runs/llama-finetune", True), (str(tmp_path / "moved" / "llama"), False)):
        Scores(tensors, {**random_scores(llama).meta, "model": scored}).save(tmp_path / "s.safetensors", overwrite=True)
        assert load_scores(tmp_path / "s.safetensors", llama, str(checkpoints / "llama")).tensors.keys() == tensors.keys()
        err = capsys.readouterr().err
        assert (err.startswith("note:") and f"computed on {scored}, not" in err) == noted, err


def test_cli_computes_scores_on_the_fly(tmp_path):
    save_tiny("qwen2", tmp_path / "teacher")
    tiny_tokenizer().save_pretrained(tmp_path / "teacher")
    (tmp_path / "calib.txt").write_text("the quick brown fox jumps over the lazy dog\n\n" * 50)
    out = tmp_path / "student"
    result = cli(tmp_path / "teacher", "-o", out, "--ffn-size", 48, "--calib", tmp_path / "calib.txt",
                 "--samples", 4, "--seq-len", 16)  # fmt: skip
    assert result.returncode == 0, result.stderr
    from minitron.importance import Scores

    scores = Scores.load(out / "scores.safetensors", expect=Shape.from_config(tiny_model("qwen2").config))
    assert json.loads((out / "plan.json").read_text())["scores"]["sha256"] == scores.digest
    assert (out / "tokenizer.json").is_file()


def assert_refused(result, out, *needles):
    """One line on stderr, exit 2, no traceback, and nothing written where OUT would go."""
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))


def corrupt(path: Path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize(
    "case",
    ["missing", "no-config", "unsupported", "too-large", "heads-vs-groups", "experts-vs-top-k", "no-scores",
     "other-model-scores", "corrupt-scores", "corrupt-checkpoint", "no-weights", "bad-layers"],
)  # fmt: skip
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, checkpoints, case):
    import shutil

    out = tmp_path / "out"
    llama = checkpoints / "llama"
    if case == "missing":
        assert_refused(cli(tmp_path / "nope", "-o", out), out, "no such file")
    elif case == "no-config":
        assert_refused(cli(tmp_path, "-o", out), out, "config.json")
    elif case == "unsupported":
        (tmp_path / "bert").mkdir()
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
        assert_refused(cli(tmp_path / "bert", "-o", out), out, "bert", "llama")
    elif case == "too-large":
        assert_refused(cli(llama, "-o", out, "--hidden-size", 128), out, "--hidden-size", "larger than")
    elif case == "heads-vs-groups":
        assert_refused(cli(llama, "-o", out, "--heads", 3), out, "do not divide into 2 KV groups")
    elif case == "experts-vs-top-k":
        assert_refused(cli(checkpoints / "granitemoe", "-o", out, "--experts", 1), out, "top-k", "--top-k 1")
    elif case == "no-scores":
        assert_refused(cli(llama, "-o", out, "--ffn-size", 48), out, "--scores", "--calib")
    elif case == "other-model-scores":
        result = cli(llama, "-o", out, "--ffn-size", 48, "--scores", checkpoints / "mistral-scores.safetensors")
        assert_refused(result, out, "different model")
    elif case == "corrupt-scores":
        shutil.copy(checkpoints / "scores.safetensors", tmp_path / "scores.safetensors")
        corrupt(tmp_path / "scores.safetensors")
        result = cli(llama, "-o", out, "--ffn-size", 48, "--scores", tmp_path / "scores.safetensors")
        assert_refused(result, out, "scores")
    elif case == "corrupt-checkpoint":
        shutil.copytree(llama, tmp_path / "teacher")
        corrupt(tmp_path / "teacher" / "model.safetensors")
        assert_refused(cli(tmp_path / "teacher", "-o", out, "--drop-layers", 1), out, "damaged safetensors")
    elif case == "no-weights":
        (tmp_path / "teacher").mkdir()
        shutil.copy(llama / "config.json", tmp_path / "teacher")
        assert_refused(cli(tmp_path / "teacher", "-o", out, "--drop-layers", 1), out, "no *.safetensors")
    elif case == "bad-layers":
        assert_refused(cli(llama, "-o", out, "--drop-layers", "2-9"), out, "layer 9 does not exist")


def test_existing_output_is_refused_unless_overwrite(tmp_path, checkpoints):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = cli(checkpoints / "llama", "-o", out, "--drop-layers", 1)
    assert result.returncode == 2 and "already exists" in result.stderr and "Traceback" not in result.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and not list(tmp_path.glob(".out*"))
    result = cli(checkpoints / "llama", "-o", out, "--drop-layers", 1, "--overwrite")
    assert result.returncode == 0, result.stderr
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()

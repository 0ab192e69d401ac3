"""Importance scores: the invariants that make them meaningful, layer-by-layer == whole-model, the artifact,
and the CLI's user errors. Every family, tiny random models, CPU."""

import json

import pytest
import torch
from clirun import assert_user_error, minitron
from tiny import save_tiny, tiny_model, tiny_tokenizer

from minitron.errors import UserError
from minitron.families import Shape
from minitron.importance import Scores, compute_scores, score_checkpoint
from minitron.importance_hooks import BatchAgg, Recorder, reduce_seq, reduce_seq_rows
from minitron.plan import norm_count


def blocks(samples=5, seq_len=12, seed=0):
    return torch.randint(0, 128, (samples, seq_len), generator=torch.Generator().manual_seed(seed))


def scores_of(model, data=None, **kw):
    return compute_scores(model, blocks() if data is None else data, batch_size=2, show_progress=False, **kw)


def assert_same(a: Scores, b: Scores, **tol):
    assert a.tensors.keys() == b.tensors.keys()
    for key in a.tensors:
        torch.testing.assert_close(a[key], b[key], msg=key, **tol)


# --- aggregation ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_reduce_seq_is_the_named_statistic_of_magnitudes(how):
    x = torch.randn(3, 7, 5)
    m = x.abs()
    naive = {"mean": m.mean(1), "l2": m.square().sum(1).sqrt(), "var": m.var(1, correction=0)}[how]
    torch.testing.assert_close(reduce_seq(x, how), naive)


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_reduce_seq_rows_equals_reduce_seq_and_gives_absent_samples_zero(how):
    x = torch.randn(2, 6, 4)
    rows, sample = x.reshape(12, 4), torch.arange(2).repeat_interleave(6)
    got = reduce_seq_rows(rows, sample, 3, how)  # a third sample with no rows
    torch.testing.assert_close(got[:2], reduce_seq(x, how), rtol=1e-5, atol=1e-6)
    assert torch.equal(got[2], torch.zeros(4))


@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_streaming_batch_aggregation_equals_all_at_once(how):
    x = 3.0 + torch.randn(23, 4)  # an offset makes a naive E[x²] − E[x]² variance lose digits
    agg = BatchAgg(how)
    for part in x.split([1, 7, 5, 10]):
        agg.add(part)
    naive = {"mean": x.mean(0), "l2": x.square().sum(0).sqrt(), "var": x.var(0, correction=0)}[how]
    torch.testing.assert_close(agg.result(), naive, rtol=1e-5, atol=1e-6)


# --- shapes, determinism, aggregation choices ------------------------------------------------------------------


def test_score_keys_and_shapes(family_name):
    model = tiny_model(family_name)
    shape = Shape.from_config(model.config)
    s = scores_of(model, layer_loss=True)
    expected = {"hidden": (shape.hidden,), "blocks": (shape.layers,), "layer_loss": (shape.layers,)}
    expected["norm_energy"] = (norm_count(shape), shape.hidden)
    for i in range(shape.layers):
        expected |= {f"heads.{i}": (shape.heads,), f"kv_groups.{i}": (shape.kv_heads,)}
        if shape.experts:
            expected |= {
                f"neurons.{i}": (shape.experts, shape.ffn),
                f"expert_tokens.{i}": (shape.experts,),
                f"expert_norm.{i}": (shape.experts,),
            }
        else:
            expected[f"neurons.{i}"] = (shape.ffn,)
    assert {k: tuple(v.shape) for k, v in s.tensors.items()} == expected
    assert all(torch.isfinite(v.float()).all() for v in s.tensors.values())
    if shape.experts:
        # Every token goes to exactly top_k experts in every layer.
        tokens = blocks().numel()
        assert all(int(s[f"expert_tokens.{i}"].sum()) == tokens * shape.top_k for i in range(shape.layers))


def test_scores_are_deterministic_for_a_seed():
    tok = tiny_tokenizer()
    from minitron.data import token_blocks

    docs = [f"the quick fox {i} jumps over the lazy dog" for i in range(100)]
    model = tiny_model("llama")
    a = scores_of(model, token_blocks(tok, docs, seq_len=16, samples=4, seed=3))
    b = scores_of(model, token_blocks(tok, docs, seq_len=16, samples=4, seed=3))
    c = scores_of(model, token_blocks(tok, docs, seq_len=16, samples=4, seed=4))
    assert all(torch.equal(a[k], b[k]) for k in a.tensors)
    assert not torch.equal(a["hidden"], c["hidden"])


@pytest.mark.parametrize(
    "name,batch_agg,seq_agg",
    [("llama", "l2", "mean"), ("llama", "mean", "l2"), ("llama", "var", "var"), ("nemotron", "l2", "mean")],
)
def test_hooked_scores_equal_naive_scores_from_stored_activations(name, batch_agg, seq_agg):
    """Hooks aggregate on the fly; here every activation is kept and aggregated afterwards. Nemotron: its
    neurons are down_proj's input, relu²(up(x)), and its channels LayerNorm1P's outputs (bias included).
    ``norm_energy``: each norm's input, its mean square per channel over every token, whatever the
    aggregations (in forward order: each layer's norms, then the final one)."""
    model = tiny_model(name)
    shape = Shape.from_config(model.config)
    data = blocks()
    kept = {"o": [], "down": [], "norms": []}
    layer = model.model.layers[1]
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(lambda m, a: kept["o"].append(a[0])),
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a: kept["down"].append(a[0])),
    ]
    norms = [m for n, m in model.named_modules() if n.endswith("norm")]
    handles += [
        n.register_forward_hook(lambda m, a, o, i=i: kept["norms"].append((i, o, a[0]))) for i, n in enumerate(norms)
    ]
    with torch.no_grad():
        for start in range(0, len(data), 2):
            model(data[start : start + 2])
    for h in handles:
        h.remove()

    def naive(per_token):  # [samples, S, C] magnitudes → one score vector
        m = per_token.abs()
        per_sample = {"mean": m.mean(1), "l2": m.square().sum(1).sqrt(), "var": m.var(1, correction=0)}[seq_agg]
        return {
            "mean": per_sample.mean(0),
            "l2": per_sample.square().sum(0).sqrt(),
            "var": per_sample.var(0, correction=0),
        }[batch_agg]

    o = torch.cat(kept["o"])
    per_head = o.view(*o.shape[:2], shape.heads, shape.head_dim).norm(dim=-1)
    per_norm = torch.stack([naive(torch.cat([out for j, out, _ in kept["norms"] if j == i])) for i in range(len(norms))])
    hidden = per_norm.sum(0)
    inputs = [torch.cat([x for j, _, x in kept["norms"] if j == i]) for i in range(len(norms))]
    energy = torch.stack([x.square().mean((0, 1)) for x in inputs])
    s = scores_of(model, data, batch_agg=batch_agg, seq_agg=seq_agg)
    torch.testing.assert_close(s["heads.1"], naive(per_head), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["neurons.1"], naive(torch.cat(kept["down"])), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["hidden"], hidden, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(s["norm_energy"], energy, rtol=1e-4, atol=1e-6)
    # --norm-agg max-share: each channel's largest share of one norm's total; nothing else changes.
    shares = scores_of(model, data, batch_agg=batch_agg, seq_agg=seq_agg, norm_agg="max-share")
    torch.testing.assert_close(shares["hidden"], (per_norm / per_norm.sum(1, keepdim=True)).amax(0), rtol=1e-4, atol=1e-7)
    assert shares.meta["settings"]["norm_agg"] == "max-share" and s.meta["settings"]["norm_agg"] == "sum"
    assert all(torch.equal(shares[k], s[k]) for k in s.tensors if k != "hidden")


# --- invariants: a unit that does nothing scores nothing ---------------------------------------------------------


def zero_channel_in_every_norm(model, channel, final=True):
    """Make every norm over the embedding channels output 0 at ``channel``: RMSNorm by a 0 weight,
    LayerNorm1P (which scales by 1 + weight) by weight −1 and bias 0."""
    hidden = model.config.hidden_size
    for name, module in model.named_modules():
        if name.endswith("norm") and module.weight.shape == (hidden,) and (final or name != "model.norm"):
            layer_norm_1p = isinstance(module, torch.nn.LayerNorm)
            module.weight[channel] = -1.0 if layer_norm_1p else 0.0
            if getattr(module, "bias", None) is not None:
                module.bias[channel] = 0


def test_zeroed_neurons_heads_and_channels_score_zero(family_name):
    model = tiny_model(family_name)
    shape = Shape.from_config(model.config)
    layer = model.model.layers[2]
    hd = shape.head_dim
    with torch.no_grad():
        # Neuron 5: a zero gate row makes act(gate) · up = 0 (SiLU(0) = 0); without a gate (Nemotron) a zero
        # up row makes relu²(up) = 0. Either way its down-projection input is 0.
        if shape.experts:
            layer.get_submodule(shape.family.moe).experts.gate_up_proj[1, 5] = 0
        elif hasattr(layer.mlp, "gate_proj"):
            layer.mlp.gate_proj.weight[5] = 0
        else:
            layer.mlp.up_proj.weight[5] = 0
        # KV group 1: zero value projections make every query head in the group output 0.
        layer.self_attn.v_proj.weight[hd : 2 * hd] = 0
        if layer.self_attn.v_proj.bias is not None:
            layer.self_attn.v_proj.bias[hd : 2 * hd] = 0
        # Channel 7: every norm over the embedding channels outputs 0 there.
        zero_channel_in_every_norm(model, 7)
    s = scores_of(model)
    neurons = s["neurons.2"][1] if shape.experts else s["neurons.2"]
    assert neurons[5] == 0 and (neurons[torch.arange(len(neurons)) != 5] > 0).all()
    group_heads = shape.heads // shape.kv_heads
    assert (s["heads.2"][group_heads : 2 * group_heads] == 0).all() and (s["heads.2"][:group_heads] > 0).all()
    assert s["kv_groups.2"][1] == 0 and s["kv_groups.2"][0] > 0
    assert s["hidden"][7] == 0 and (s["hidden"][torch.arange(shape.hidden) != 7] > 0).all()


@pytest.mark.parametrize("name", ["llama", "nemotron"])  # RMSNorm; LayerNorm1P with bias
def test_hidden_sums_every_norm(name):
    """Zero channel 7 in every norm but the final one: the final norm alone keeps its score above 0."""
    model = tiny_model(name)
    with torch.no_grad():
        zero_channel_in_every_norm(model, 7, final=False)
    s = scores_of(model)
    assert s["hidden"][7] > 0
    with torch.no_grad():
        zero_channel_in_every_norm(model, 7)
    assert scores_of(model)["hidden"][7] == 0


def test_identity_layer_has_no_block_importance_and_no_loss_rise(family_name):
    model = tiny_model(family_name)
    layer = model.model.layers[1]
    with torch.no_grad():
        # Attention and MLP outputs become 0, so the layer's output is exactly its input.
        layer.self_attn.o_proj.weight.zero_()
        family = Shape.from_config(model.config).family
        if family.is_moe:
            layer.get_submodule(family.moe).experts.down_proj.zero_()
        else:
            layer.get_submodule(family.mlp_down).weight.zero_()
    s = scores_of(model, layer_loss=True)
    assert s["blocks"][1].abs() < 1e-6
    assert s["layer_loss"][1] == 0
    others = [0, 2, 3]
    assert (s["blocks"][others] > 1e-6).all() and (s["layer_loss"][others] != 0).all()


@pytest.mark.parametrize("name", ["granitemoe", "qwen3_moe"])
def test_moe_instrumentation_leaves_outputs_unchanged(name):
    model = tiny_model(name)
    ids = blocks(2, 16)
    with torch.no_grad():
        default = model(ids).logits
        model.set_experts_implementation("eager")
        eager = model(ids).logits
        recorder = Recorder(model, Shape.from_config(model.config))
        instrumented = model(ids).logits
        recorder.remove()
        restored = model(ids).logits
    assert torch.equal(instrumented, eager)  # same operations in the same order
    torch.testing.assert_close(instrumented, default)
    assert torch.equal(restored, eager)
    moe = model.model.layers[0].get_submodule(Shape.from_config(model.config).family.moe)
    assert "forward" not in vars(moe.experts)



def test_expert_norm_weighs_how_often_an_expert_is_chosen():
    """A constructed router: expert 0 gets every token but one per sample, expert 1 (a copy of expert 0 with a
    4× output) that one token. Per token routed to it expert 1 is the strongest, but over the sequence it adds far less:
    expert_norm must rank as the contribution to the sequence does (here as expert_tokens), equal to the L2 over
    samples of ``Σ_t ‖y_t‖ / S`` (zero on tokens an expert was not sent), as computed by hand."""
    model = tiny_model("granitemoe", num_experts_per_tok=1)
    moe = model.model.layers[1].block_sparse_moe
    samples, seq = 3, 16
    one = torch.zeros(samples, seq, dtype=torch.long)
    one[:, 4] = 1  # the one token per sample that goes to expert 1

    def route(hidden_states):  # [batch × seq, hidden] → (logits, top-k weights, top-k index)
        index = one[: len(hidden_states) // seq].reshape(-1, 1)
        return torch.zeros(len(index), 4), torch.ones(len(index), 1), index

    moe.router.forward = route
    with torch.no_grad():
        moe.experts.gate_up_proj[1] = moe.experts.gate_up_proj[0]
        moe.experts.down_proj[1] = 4 * moe.experts.down_proj[0]
    inputs = []
    moe.register_forward_pre_hook(lambda module, args: inputs.append(args[0]))
    s = scores_of(model, blocks(samples, seq), batch_agg="l2", seq_agg="mean")
    tokens, norm = s["expert_tokens.1"], s["expert_norm.1"]
    assert tokens.tolist() == [samples * (seq - 1), samples, 0, 0]
    assert norm[0] > norm[1] > 0 and norm[2] == norm[3] == 0

    x = torch.cat(inputs[-2:])  # the scored pass (batches of 2 and 1): [samples, seq, hidden]
    experts = moe.experts
    expected = []
    for e in range(2):
        gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[e]).chunk(2, dim=-1)
        y = torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[e]).norm(dim=-1)
        per_sample = (y * (one == e)).sum(1) / seq
        expected.append(per_sample.square().sum().sqrt())
    torch.testing.assert_close(norm[:2], torch.stack(expected), rtol=1e-4, atol=1e-6)

# --- layer by layer == whole model ------------------------------------------------------------------------------


def test_layer_by_layer_equals_whole_model(family_name):
    model = tiny_model(family_name)
    data = blocks(5, 12)  # batch 2 leaves a last batch of 1; chunks of 4 split it across chunks
    whole = scores_of(model, data, layer_loss=True)
    offloaded = scores_of(model, data, layer_loss=True, offload=True, chunk=4)
    assert_same(whole, offloaded, rtol=1e-5, atol=1e-6)


def test_streamed_checkpoint_equals_whole_model(family_name, tmp_path):
    model = save_tiny(family_name, tmp_path)
    data = blocks(5, 12)
    whole = scores_of(model, data, layer_loss=True)
    streamed = score_checkpoint(tmp_path, data, batch_size=2, layer_loss=True, chunk=2, show_progress=False)
    assert_same(whole, streamed, rtol=1e-5, atol=1e-6)
    shares = score_checkpoint(tmp_path, data, batch_size=2, chunk=2, norm_agg="max-share", show_progress=False)
    assert_same(scores_of(model, data, norm_agg="max-share"), shares, rtol=1e-5, atol=1e-6)


def test_streamed_checkpoint_in_the_in_memory_layout_equals_whole_model(tmp_path):
    """Qwen3-MoE saved with fused expert tensors (its in-memory names) streams like the per-expert layout."""
    from safetensors.torch import save_file

    model = tiny_model("qwen3_moe")
    model.config.save_pretrained(tmp_path)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "model.safetensors")
    data = blocks(3, 12)
    streamed = score_checkpoint(tmp_path, data, batch_size=2, chunk=2, show_progress=False)
    assert_same(scores_of(model, data), streamed, rtol=1e-5, atol=1e-6)


def test_offload_restores_the_model():
    model = tiny_model("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores_of(model, offload=True, chunk=2)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(vars(m).get("_forward_hooks") or vars(m).get("_forward_pre_hooks") for m in model.modules())


# --- the artifact --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_scores():
    return scores_of(tiny_model("granitemoe"), layer_loss=True, meta={"model": "tiny", "data": {"source": "x"}})


def test_save_load_round_trips_exactly(moe_scores, tmp_path):
    path = moe_scores.save(tmp_path / "s.safetensors")
    loaded = Scores.load(path, expect=moe_scores.shape)
    assert loaded.tensors.keys() == moe_scores.tensors.keys()
    assert all(torch.equal(loaded[k], moe_scores[k]) and loaded[k].dtype == moe_scores[k].dtype for k in loaded.tensors)
    assert loaded.meta == json.loads(json.dumps(moe_scores.meta))
    assert loaded.meta["model"] == "tiny" and loaded.meta["settings"]["batch_agg"] == "l2"
    assert loaded.meta["shape"]["model_type"] == "granitemoe" and "torch" in loaded.meta["versions"]


def test_save_refuses_to_overwrite(moe_scores, tmp_path):
    path = moe_scores.save(tmp_path / "s.safetensors")
    with pytest.raises(UserError, match="already exists"):
        moe_scores.save(path)


def test_load_refuses_another_shape(moe_scores, tmp_path):
    path = moe_scores.save(tmp_path / "s.safetensors")
    with pytest.raises(UserError, match="different model .*experts 4 ≠ 8"):
        Scores.load(path, expect=moe_scores.shape.replace(experts=8))


@pytest.mark.parametrize("damage", ["flip", "truncate", "garbage"])
def test_load_refuses_a_corrupt_file(moe_scores, tmp_path, damage):
    path = moe_scores.save(tmp_path / "s.safetensors")
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-3] ^= 0xFF  # inside the tensor data: only the digest notices
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    else:
        raw = bytearray(b"not safetensors at all")
    path.write_bytes(bytes(raw))
    with pytest.raises(UserError, match="corrupt"):
        Scores.load(path)


# --- the CLI -------------------------------------------------------------------------------------------------------


def cli(*args):
    return minitron("importance", *args)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    save_tiny("granite", root / "model")
    tiny_tokenizer().save_pretrained(root / "model")
    (root / "calib.txt").write_text("\n".join(f"the quick fox {i} jumps over the lazy dog" for i in range(200)))
    return root


def test_cli_writes_scores_and_prints_a_summary(checkpoint, tmp_path):
    out = tmp_path / "scores.safetensors"
    r = cli(checkpoint / "model", "--calib", checkpoint / "calib.txt", "-o", out, "--samples", 6, "--seq-len", 16,
            "--batch-size", 2, "--layer-loss")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "block importance" in r.stdout and "layer-loss rise" in r.stdout
    s = Scores.load(out, expect=Shape.from_config(tiny_model("granite").config))
    assert s.meta["data"] == {"source": str(checkpoint / "calib.txt"), "split": "train", "samples": 6, "seq_len": 16, "seed": 0}
    assert s.meta["settings"]["mode"] == "whole-model" and "layer_loss" in s.tensors
    assert [p.name for p in tmp_path.iterdir()] == ["scores.safetensors"]


@pytest.mark.parametrize("case", ["missing", "no-config", "unsupported", "empty-calib", "exists", "bad-agg"])
def test_cli_user_errors(checkpoint, tmp_path, case):
    model, calib, out = checkpoint / "model", checkpoint / "calib.txt", tmp_path / "s.safetensors"
    extra, needles = [], []
    if case == "missing":
        model, needles = tmp_path / "nope", ["no such file"]
    elif case == "no-config":
        model = tmp_path / "empty"
        model.mkdir()
        needles = ["config.json"]
    elif case == "unsupported":
        model = tmp_path / "bert"
        model.mkdir()
        (model / "config.json").write_text('{"model_type": "bert"}')
        needles = ["bert", "llama"]
    elif case == "empty-calib":
        calib = tmp_path / "empty.txt"
        calib.write_text("\n")
        needles = [str(calib), "no text"]
    elif case == "exists":
        out.write_text("keep me")
        needles = ["already exists", "--overwrite"]
    else:
        extra, needles = ["--batch-agg", "max"], ["--batch-agg", "mean, l2, var"]
    before = sorted(p.name for p in tmp_path.iterdir())
    assert_user_error(cli(model, "--calib", calib, "-o", out, "--samples", 2, "--seq-len", 8, *extra), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    if case == "exists":
        assert out.read_text() == "keep me"


def test_a_model_that_does_not_fit_is_streamed_automatically(checkpoint, tmp_path, monkeypatch):
    import minitron.importance as imp

    common = dict(samples=4, seq_len=12, batch_size=2, device="cpu", show_progress=False)
    whole, info = imp.run(str(checkpoint / "model"), str(checkpoint / "calib.txt"), tmp_path / "a.safetensors", **common)
    assert info["mode"] == "whole-model"
    monkeypatch.setattr(imp, "free_memory", lambda device: 1 << 10)  # 1 KiB free: the tiny model won't fit
    streamed, info = imp.run(str(checkpoint / "model"), str(checkpoint / "calib.txt"), tmp_path / "b.safetensors", **common)
    assert info["mode"] == "streamed"
    assert_same(whole, streamed, rtol=1e-5, atol=1e-6)


def test_chunks_fill_the_budget_in_whole_batches():
    from minitron.layerwise import chunk_samples

    shape = Shape.from_config(tiny_model("llama").config)  # hidden 64, 4 layers
    per_sample = 16 * 64 * 4  # seq_len 16, float32
    assert chunk_samples(shape, 16, 2, False, "cpu", torch.float32, budget=7 * per_sample) == 6
    assert chunk_samples(shape, 16, 2, True, "cpu", torch.float32, budget=7 * per_sample) == 2  # 5 states a sample
    assert chunk_samples(shape, 16, 3, False, "cpu", torch.float32, budget=1) == 3  # never below one batch


def rewrite_scores(path, edit_meta=lambda meta: None, edit_tensors=lambda tensors: None):
    """Edit a scores file's header or tensors and record the digest anew, so that only the new checks can tell."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(path), framework="pt") as f:
        meta, tensors = json.loads(f.metadata()["minitron"]), {k: f.get_tensor(k) for k in f.keys()}
    edit_tensors(tensors)
    edit_meta(meta)
    meta["digest"] = Scores(tensors).digest
    save_file(tensors, str(path), metadata={"minitron": json.dumps(meta)})


@pytest.mark.parametrize(
    "edit,needle",
    [
        (lambda m: m.pop("shape"), "no 'shape'"),
        (lambda m: m["shape"].update(extra=1), "unknown key 'shape.extra'"),
        (lambda m: m.update(shape=[1, 2]), "'shape' is a list, not a mapping"),
        (lambda m: m["shape"].pop("hidden"), "no 'shape.hidden'"),
        (lambda m: m["shape"].update(hidden="64"), "'shape.hidden' is '64', not int"),
        (lambda m: m["settings"].update(samples=[2]), "'settings.samples' is [2]"),
    ],
    ids=["no-shape", "extra-key", "list", "missing-key", "string", "settings"],
)
def test_load_refuses_a_malformed_header_with_one_line(moe_scores, tmp_path, edit, needle):
    path = moe_scores.save(tmp_path / "s.safetensors")
    rewrite_scores(path, edit_meta=edit)
    with pytest.raises(UserError) as e:
        Scores.load(path, expect=moe_scores.shape)
    line = e.value.line()
    assert "\n" not in line and str(path) in line and "malformed scores header" in line and needle in line, line
    assert "minitron importance" in line


@pytest.mark.parametrize(
    "key,dtype",
    [("blocks", torch.float8_e4m3fn), ("hidden", torch.float64), ("heads.0", torch.int64), ("expert_tokens.0", torch.float32)],
)
def test_load_refuses_tensors_of_another_dtype(moe_scores, tmp_path, key, dtype):
    path = moe_scores.save(tmp_path / "s.safetensors")
    rewrite_scores(path, edit_tensors=lambda t: t.update({key: t[key].to(dtype)}))
    with pytest.raises(UserError) as e:
        Scores.load(path, expect=moe_scores.shape)
    line = e.value.line()
    assert "\n" not in line and repr(key) in line and str(dtype).removeprefix("torch.") in line, line
    # Half precision is read (and counts stay int64).
    moe_scores.save(path, overwrite=True)
    rewrite_scores(path, edit_tensors=lambda t: t.update({k: v.bfloat16() for k, v in t.items() if v.is_floating_point()}))
    assert Scores.load(path, expect=moe_scores.shape)["expert_tokens.0"].dtype == torch.int64


def test_load_refuses_a_newer_format_version(moe_scores, tmp_path):
    path = moe_scores.save(tmp_path / "s.safetensors")
    rewrite_scores(path, edit_meta=lambda m: m.update(format_version=99))
    with pytest.raises(UserError, match="format_version 99 is not one this minitron reads"):
        Scores.load(path, expect=moe_scores.shape)

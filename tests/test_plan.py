"""Plans: the student shape from flags, which units the scores keep, and the plan file."""

import json
from pathlib import Path

import pytest
import torch
from tiny import tiny_config

from minitron.errors import UserError
from minitron.families import Shape
from minitron.inputs import read_config
from minitron.importance import Scores
from minitron.plan import (
    LayerPlan,
    Plan,
    identity_plan,
    layer_ranges,
    make_plan,
    norm_count,
    parse_layers,
    student_shape,
)

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"


def random_scores(shape: Shape, seed: int = 0, **fixed) -> Scores:
    """Scores with every contract key for ``shape``; ``fixed`` overrides some of them."""
    g = torch.Generator().manual_seed(seed)
    tensors = {"hidden": torch.rand(shape.hidden, generator=g), "blocks": torch.rand(shape.layers, generator=g)}
    for i in range(shape.layers):
        tensors[f"heads.{i}"] = torch.rand(shape.heads, generator=g)
        tensors[f"kv_groups.{i}"] = torch.rand(shape.kv_heads, generator=g)
        if shape.experts:
            tensors[f"neurons.{i}"] = torch.rand(shape.experts, shape.ffn, generator=g)
            tensors[f"expert_norm.{i}"] = torch.rand(shape.experts, generator=g)
            tensors[f"expert_tokens.{i}"] = torch.randint(0, 100, (shape.experts,), generator=g)
        else:
            tensors[f"neurons.{i}"] = torch.rand(shape.ffn, generator=g)
    tensors.update(fixed)
    return Scores(tensors, {"shape": shape.to_dict()})


def tiny_shape(name: str) -> Shape:
    return Shape.from_config(tiny_config(name))


# --- the student shape -------------------------------------------------------------------------------------


def test_parse_layers():
    assert parse_layers("16-31", 32) == list(range(16, 32))
    assert parse_layers("3, 5,10-12,5", 32) == [3, 5, 10, 11, 12]
    assert layer_ranges([3, 5, 10, 11, 12]) == "3,5,10-12"


@pytest.mark.parametrize("text, needle", [("a-b", "not a layer or a range"), ("3-", "closed ranges"), ("5-3", "backwards"),
                                          ("30-32", "does not exist"), ("0-31", "every layer"), ("-1", "not a")])
def test_parse_layers_refuses(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_layers(text, 32)


def test_full_size_width_and_depth_shapes():
    """The published Minitron-4B shapes come out of the explicit flags, counts included."""
    teacher = Shape.from_config(read_config(SHARED / "llama-3.1-8b"))
    width = student_shape(teacher, hidden=3072, ffn=9216)
    assert width == Shape.from_config(read_config(SHARED / "llama-3.1-minitron-4b-width"))
    assert width.counts()["total"] == 4_512_746_496
    depth = student_shape(teacher, drop_layers=parse_layers("16-31", 32))
    assert depth == Shape.from_config(read_config(SHARED / "llama-3.1-minitron-4b-depth"))
    assert depth.counts()["total"] == 4_540_469_248


def test_kv_heads_alone_removes_whole_groups():
    teacher = tiny_shape("llama")  # 4 heads in 2 groups
    assert student_shape(teacher, kv_heads=1).heads == 2
    assert student_shape(teacher, heads=2).kv_heads == 2


@pytest.mark.parametrize(
    "name, flags, needle",
    [
        ("llama", dict(hidden=128), "larger than the teacher's 64"),
        ("llama", dict(ffn=0), "at least 1"),
        ("llama", dict(heads=3), "do not divide"),
        ("llama", dict(heads=4, kv_heads=1), "each group has 2"),
        ("llama", dict(layers=5), "larger"),
        ("llama", dict(layers=3, drop_layers=[0, 1]), "disagrees"),
        ("llama", dict(experts=2), "no experts"),
        ("granitemoe", dict(ffn=16), "--expert-ffn-size"),
        ("granitemoe", dict(experts=1), "fewer than the router's top-k 2"),
        ("granitemoe", dict(experts=0, top_k=0), "at least 1"),
        ("granitemoe", dict(top_k=3), "larger"),
    ],
)
def test_student_shape_refuses(name, flags, needle):
    with pytest.raises(UserError, match=needle):
        student_shape(tiny_shape(name), **flags)


def test_fewer_experts_than_top_k_needs_an_explicit_top_k():
    student = student_shape(tiny_shape("granitemoe"), experts=1, top_k=1)
    assert (student.experts, student.top_k) == (1, 1)


# --- which units the scores keep ---------------------------------------------------------------------------


def test_identity_plan_keeps_everything(family_name):
    shape = tiny_shape(family_name)
    plan = identity_plan(shape)
    assert plan.hidden == list(range(shape.hidden)) and plan.dropped_layers == []
    for i, layer in enumerate(plan.layers):
        assert layer.source == i and layer.heads == list(range(shape.heads))


def test_top_scored_units_are_kept():
    teacher = tiny_shape("llama")  # hidden 64, ffn 96, 4 heads in 2 groups, 4 layers
    hidden = torch.arange(64.0).flip(0)  # channel 0 scores highest
    heads = torch.tensor([0.1, 0.9, 0.8, 0.2])  # best head of group 0 is 1, of group 1 is 2
    scores = random_scores(teacher, hidden=hidden, blocks=torch.tensor([0.5, 0.1, 0.9, 0.3]),
                           **{"heads.0": heads, "neurons.0": torch.arange(96.0)})  # fmt: skip
    plan = make_plan(teacher, student_shape(teacher, hidden=16, ffn=10, heads=2, layers=3), scores)
    assert plan.hidden == list(range(16))
    assert plan.dropped_layers == [1]  # the lowest block importance
    assert plan.layers[0].heads == [1, 2] and plan.layers[0].kv_groups == [0, 1]
    assert plan.layers[0].neurons == list(range(86, 96))


def test_heads_stay_in_their_kv_groups():
    """Dropping a whole group drops its heads; the kept heads are listed group by group."""
    teacher = Shape.from_config(read_config(SHARED / "llama-3.1-8b"))  # 32 heads in 8 groups
    scores = random_scores(teacher, seed=3)
    plan = make_plan(teacher, student_shape(teacher, heads=8, kv_heads=4), scores)
    for layer in plan.layers:
        groups = scores[f"kv_groups.{layer.source}"]
        assert layer.kv_groups == sorted(groups.argsort(descending=True)[:4].tolist())
        assert [h // 4 for h in layer.heads] == [g for g in layer.kv_groups for _ in range(2)]
        best_two = [sorted(scores[f"heads.{layer.source}"][g * 4 : g * 4 + 4].argsort(descending=True)[:2].tolist())
                    for g in layer.kv_groups]  # fmt: skip
        assert layer.heads == [g * 4 + h for g, pair in zip(layer.kv_groups, best_two) for h in pair]


def test_moe_experts_and_their_own_neurons():
    teacher = tiny_shape("granitemoe")  # 4 experts, top-2, expert ffn 32
    neurons = torch.rand(4, 32, generator=torch.Generator().manual_seed(1))
    scores = random_scores(teacher, **{"expert_norm.0": torch.tensor([3.0, 0.0, 2.0, 1.0]), "neurons.0": neurons})
    plan = make_plan(teacher, student_shape(teacher, experts=2, expert_ffn=8), scores)
    layer = plan.layers[0]
    assert layer.experts == [0, 2]
    assert layer.neurons == [sorted(neurons[e].argsort(descending=True)[:8].tolist()) for e in (0, 2)]
    by_tokens = make_plan(teacher, student_shape(teacher, experts=2), scores, expert_key="expert_tokens")
    assert by_tokens.layers[0].experts == sorted(scores["expert_tokens.0"].argsort(descending=True)[:2].tolist())


def test_layer_loss_is_preferred_when_present():
    teacher = tiny_shape("qwen2")
    blocks, loss = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([0.4, 0.3, 0.2, 0.1])
    student = student_shape(teacher, layers=2)
    assert make_plan(teacher, student, random_scores(teacher, blocks=blocks)).dropped_layers == [0, 1]
    with_loss = random_scores(teacher, blocks=blocks, layer_loss=loss)
    assert make_plan(teacher, student, with_loss).dropped_layers == [2, 3]
    assert make_plan(teacher, student, with_loss, depth_key="blocks").dropped_layers == [0, 1]


def test_explicit_drop_needs_no_scores():
    teacher = tiny_shape("mistral")
    plan = make_plan(teacher, student_shape(teacher, drop_layers=[1, 2]), None, drop_layers=[1, 2])
    assert [layer.source for layer in plan.layers] == [0, 3] and plan.scores == {}


def test_ties_break_to_the_lower_index():
    teacher = tiny_shape("llama")
    scores = random_scores(teacher, hidden=torch.ones(64))
    assert make_plan(teacher, student_shape(teacher, hidden=8), scores).hidden == list(range(8))


def test_missing_scores_say_how_to_get_them():
    teacher = tiny_shape("llama")
    with pytest.raises(UserError, match="--scores FILE .* or --calib") as e:
        make_plan(teacher, student_shape(teacher, ffn=48), None)
    assert e.value.where == "--ffn-size"


def test_scores_of_another_model_are_refused():
    teacher, other = tiny_shape("llama"), tiny_shape("llama").replace(hidden=32)
    with pytest.raises(UserError, match="another model"):
        make_plan(teacher, student_shape(teacher, hidden=16), random_scores(other))


def test_nan_scores_are_refused():
    teacher = tiny_shape("llama")
    bad = torch.rand(64)
    bad[3] = float("nan")
    with pytest.raises(UserError, match="NaN"):
        make_plan(teacher, student_shape(teacher, hidden=16), random_scores(teacher, hidden=bad))


# --- the plan file --------------------------------------------------------------------------------------------


def test_plan_json_round_trip(tmp_path, family_name):
    teacher = tiny_shape(family_name)
    changes = dict(hidden=48, heads=2, kv_heads=1, layers=3)
    changes.update(dict(experts=2, expert_ffn=16) if teacher.experts else dict(ffn=64))
    energy = torch.rand(norm_count(teacher), teacher.hidden, generator=torch.Generator().manual_seed(1))
    scores = random_scores(teacher, norm_energy=energy)
    plan = make_plan(teacher, student_shape(teacher, **changes), scores)
    assert len(plan.norm_scale) == (norm_count(teacher) if teacher.family.rms_norms else 0)
    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again == plan
    assert again.scores["sha256"] == scores.digest
    assert json.loads((tmp_path / "plan.json").read_text())["dropped_layers"] == plan.dropped_layers


# --- rescaling the norms that remain ----------------------------------------------------------------------------


def test_norm_scale_is_the_root_of_the_kept_channels_mean_square_over_all_channels():
    teacher = tiny_shape("llama")  # 64 channels, 4 layers: 9 norms
    energy = torch.rand(norm_count(teacher), teacher.hidden, generator=torch.Generator().manual_seed(0)) + 0.1
    energy[3, :8] = 50.0  # norm 3: the kept channels carry most of the energy
    hidden = torch.arange(teacher.hidden).float()
    hidden[:8] += 100  # channels 0-7 kept first
    scores = random_scores(teacher, hidden=hidden, norm_energy=energy)
    plan = make_plan(teacher, student_shape(teacher, hidden=16), scores)
    kept = torch.tensor(plan.hidden)
    assert kept[:8].tolist() == list(range(8))
    expected = (energy[:, kept].double().mean(1) / energy.double().mean(1)).sqrt()
    torch.testing.assert_close(torch.tensor(plan.norm_scale, dtype=torch.float64), expected)
    # A norm whose energy the kept channels hold is scaled up, at most by √(64 / 16) (all of it kept).
    assert 1.5 < plan.norm_scale[3] <= 2


def test_norms_are_not_rescaled_without_energies_a_whole_embedding_or_layer_norms():
    llama, nemotron = tiny_shape("llama"), tiny_shape("nemotron")
    energy = lambda shape: torch.rand(norm_count(shape), shape.hidden) + 0.1  # noqa: E731
    assert make_plan(llama, student_shape(llama, hidden=16), random_scores(llama)).norm_scale == []  # older scores
    narrower = student_shape(llama, ffn=32)
    assert make_plan(llama, narrower, random_scores(llama, norm_energy=energy(llama))).norm_scale == []
    # Nemotron's LayerNorm1P subtracts the mean: no factor on its weight gives the kept channels their scale.
    scores = random_scores(nemotron, norm_energy=energy(nemotron))
    plan = make_plan(nemotron, student_shape(nemotron, hidden=16), scores)
    assert plan.norm_scale == []


def test_energies_of_another_shape_and_bad_factors_are_refused(tmp_path):
    teacher = tiny_shape("llama")
    with pytest.raises(UserError, match="norm_energy"):
        make_plan(teacher, student_shape(teacher, hidden=16), random_scores(teacher, norm_energy=torch.rand(3, 64)))
    data = make_plan(teacher, student_shape(teacher, hidden=16), random_scores(teacher)).to_dict()
    for bad in ([1.0] * 3, [0.0] * norm_count(teacher), ["x"] * norm_count(teacher)):
        (tmp_path / "plan.json").write_text(json.dumps({**data, "norm_scale": bad}))
        with pytest.raises(UserError):
            Plan.load(tmp_path / "plan.json")


def test_a_tampered_plan_is_refused(tmp_path):
    plan = identity_plan(tiny_shape("llama"))
    data = plan.to_dict()
    data["layers"][0]["heads"] = [2, 3, 0, 1]  # group 1's heads listed under group 0
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="group by group"):
        Plan.load(tmp_path / "plan.json")
    data["layers"][0] = vars(LayerPlan(0, [0, 1, 2, 3], [0, 1], list(range(95)) + [0]))
    (tmp_path / "plan.json").write_text(json.dumps(data))
    with pytest.raises(UserError, match="neurons must be 96 distinct"):
        Plan.load(tmp_path / "plan.json")
    (tmp_path / "plan.json").write_text("{")
    with pytest.raises(UserError, match="not valid JSON"):
        Plan.load(tmp_path / "plan.json")

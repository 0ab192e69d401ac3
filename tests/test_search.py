"""Architecture search: candidate shapes for a parameter budget, ranking, depth strategies."""

import json
from pathlib import Path

import pytest
from clirun import assert_user_error, minitron
from tiny import tiny_config

from minitron.errors import UserError
from minitron.families import Shape
from minitron.search import (
    Budget,
    SearchSpace,
    enumerate_candidates,
    grid_step,
    parse_axes,
    parse_count,
    parse_limits,
    parse_tolerance,
)

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"


def full_shape(name: str) -> Shape:
    return Shape.from_config(json.loads((SHARED / name / "config.json").read_text()))


def candidates(teacher: Shape, target=None, *, axes="width", active=None, tolerance="2%", limits=(), heads=False):
    budget = Budget.parse(teacher, target, active, tolerance)
    space = SearchSpace.build(teacher, parse_axes(axes, teacher, heads), parse_limits(limits))
    return budget, space, enumerate_candidates(teacher, budget, space)


def assert_within(budget: Budget, found):
    """Every candidate's *recounted* parameters lie within tolerance of every target given."""
    assert found
    for c in found:
        counts = c.shape.counts()
        assert (counts["total"], counts["active"]) == (c.total, c.active)
        if budget.total:
            assert abs(counts["total"] - budget.total) <= budget.tolerance * budget.total
        if budget.active:
            assert abs(counts["active"] - budget.active) <= budget.tolerance * budget.active


# --- parsing -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [("4B", 4_000_000_000), ("4.5B", 4_500_000_000), ("800M", 800_000_000), ("1.2e9", 1_200_000_000),
     ("0.5x", 500_000_000), ("250k", 250_000), ("4.5b", 4_500_000_000)],
)
def test_parse_count(text, expected):
    assert parse_count(text, 1_000_000_000 if text.endswith("x") else 10**10) == expected


@pytest.mark.parametrize("text, needle", [("1x", "between 0 and 1"), ("1.5x", "between 0 and 1"),
                                          ("9B", "not smaller"), ("8.04B", "not smaller"), ("four", "cannot read"),
                                          ("0", "positive")])
def test_parse_count_refuses(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_count(text, 8_030_261_248)


def test_parse_tolerance_and_limits():
    assert parse_tolerance("2%") == pytest.approx(0.02) and parse_tolerance("0.05") == pytest.approx(0.05)
    for bad in ("0", "60%", "x"):
        with pytest.raises(UserError, match="--tolerance"):
            parse_tolerance(bad)
    limits = parse_limits(["ffn=0.3", "layers=0.25"])
    assert limits["ffn"] == 0.3 and limits["layers"] == 0.25 and limits["hidden"] == 0.5
    for bad in ("ffn", "mlp=0.3", "ffn=1.0", "ffn=abc"):
        with pytest.raises(UserError, match="--limit"):
            parse_limits([bad])


def test_parse_axes():
    llama, moe = full_shape("llama-3.1-8b"), full_shape("granite-3.1-1b-a400m-base")
    assert parse_axes("width", llama) == {"hidden", "ffn"}
    assert parse_axes("width", llama, prune_heads=True) == {"hidden", "ffn", "heads"}
    assert parse_axes("width,depth", llama) == {"hidden", "ffn", "layers"}
    assert parse_axes(["experts"], moe) == {"experts", "ffn"}
    with pytest.raises(UserError, match="no experts"):
        parse_axes("experts", llama)
    with pytest.raises(UserError, match="unknown axis"):
        parse_axes("heads", llama)
    with pytest.raises(UserError, match="--prune-heads"):
        parse_axes("depth", llama, prune_heads=True)
    with pytest.raises(UserError, match="dense"):
        Budget.parse(llama, "4B", "2B")


def test_grid_steps_are_hardware_friendly_and_scale_down():
    assert grid_step("hidden", 4096) == 128 and grid_step("ffn", 14336) == 256
    assert grid_step("hidden", 1024) == 64 and grid_step("ffn", 512) == 32
    assert grid_step("hidden", 64) == 4  # tiny test models still get a grid
    llama = full_shape("llama-3.1-8b")
    space = SearchSpace.build(llama, parse_axes("width,depth", llama, prune_heads=True))
    assert all(v % 128 == 0 for v in space.values["hidden"]) and min(space.values["hidden"]) == 2048
    assert all(v % 256 == 0 for v in space.values["ffn"]) and min(space.values["ffn"]) == 7168
    assert space.values["heads"] == [32, 24, 16]  # 1..4 query heads per KV group, at most half removed
    assert space.values["layers"] == list(range(32, 15, -1))
    moe = full_shape("granite-3.1-3b-a800m-base")
    experts = SearchSpace.build(moe, parse_axes("experts", moe), {"experts": 0.9}).values["experts"]
    assert min(experts) == moe.top_k  # never fewer experts than a token routes to


# --- the full-size configs -----------------------------------------------------------------------------------

MINITRON_4B_WIDTH = dict(hidden=3072, ffn=9216, heads=32, kv_heads=8, head_dim=128, layers=32)


def test_llama_width_lists_minitron_4b_width():
    budget, _, found = candidates(full_shape("llama-3.1-8b"), "4.5B", axes="width")
    assert_within(budget, found)
    match = [c for c in found if all(getattr(c.shape, k) == v for k, v in MINITRON_4B_WIDTH.items())]
    assert len(match) == 1 and match[0].total == 4_512_746_496
    # The published shape is also what the real config of Minitron-4B-Width counts to.
    assert full_shape("llama-3.1-minitron-4b-width").counts()["total"] == match[0].total
    assert all(c.shape.layers == 32 and c.shape.heads == 32 for c in found)  # width only: depth, heads kept


def test_llama_depth_lists_16_layers():
    budget, _, found = candidates(full_shape("llama-3.1-8b"), "4.5B", axes="depth")
    assert_within(budget, found)
    assert [(c.shape.layers, c.total) for c in found] == [(16, 4_540_469_248)]
    assert full_shape("llama-3.1-minitron-4b-depth").counts()["total"] == 4_540_469_248


def test_width_and_depth_prefers_keeping_layers():
    budget, _, found = candidates(full_shape("llama-3.1-8b"), "4.5B", axes="width,depth", heads=True)
    assert_within(budget, found)
    layers = [c.shape.layers for c in found]
    assert layers == sorted(layers, reverse=True) and 16 in layers and 32 in layers
    assert any(c.shape.heads < 32 for c in found)


@pytest.mark.parametrize(
    "name, target, active, axes",
    [
        ("granite-3.1-8b-base", "4B", None, "width"),
        ("granite-3.1-8b-base", "0.6x", None, "depth"),
        ("granite-3.1-2b-instruct", "1.5B", None, "width,depth"),
        ("powerlm-3b", "2B", None, "width"),
        ("granite-3.1-3b-a800m-base", "2B", None, "width,experts"),
        ("granite-3.1-3b-a800m-base", "2B", None, "experts"),
        ("granite-3.1-1b-a400m-base", None, "300M", "experts"),
        ("granite-3.1-1b-a400m-base", "800M", "300M", "width,experts"),
    ],
)
def test_granite_targets(name, target, active, axes):
    teacher = full_shape(name)
    budget, space, found = candidates(teacher, target, active=active, axes=axes)
    assert_within(budget, found)
    for c in found:
        assert c.shape != teacher
        for dim in space.dims:  # no dimension shrinks past its limit
            assert getattr(c.shape, dim) >= (1 - space.limits[dim]) * getattr(teacher, dim)
        if teacher.experts:
            assert teacher.top_k <= c.shape.experts <= teacher.experts
    if active:
        assert all(c.active < teacher.counts()["active"] for c in found)


# --- refusals ------------------------------------------------------------------------------------------------


def test_target_below_the_limits_names_the_blocking_limit():
    with pytest.raises(UserError) as e:
        candidates(full_shape("llama-3.1-8b"), "3B", axes="depth")
    line = e.value.line()
    assert "layers ≥ 16" in line and "layers 50%" in line and "--limit layers=" in line and "--axes width" in line
    with pytest.raises(UserError) as e:
        candidates(full_shape("llama-3.1-8b"), "4.5B", axes="width", limits=["ffn=0.3", "hidden=0.2"])
    assert "--limit ffn=0.45" in e.value.line()


def test_grid_too_coarse_for_the_tolerance_says_how_far():
    tiny = Shape.from_config(tiny_config("llama"))
    with pytest.raises(UserError, match=r"nearest .* off — widen --tolerance to"):
        candidates(tiny, "0.75x", axes="depth")
    budget, _, found = candidates(tiny, "0.75x", axes="depth", tolerance="5%")
    assert_within(budget, found)


def test_target_at_or_above_the_teacher_is_refused():
    llama = full_shape("llama-3.1-8b")
    for target in ("1x", "8.1B", str(llama.counts()["total"])):
        with pytest.raises(UserError, match="--target"):
            Budget.parse(llama, target)
    moe = full_shape("granite-3.1-1b-a400m-base")
    with pytest.raises(UserError, match="--active-target"):
        Budget.parse(moe, None, "500M")  # more than its 428M active


# --- tiny models ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("axes, target", [("width", "0.7x"), ("width,depth", "0.6x")])
def test_tiny_models_have_candidates_within_tolerance(family_name, axes, target):
    teacher = Shape.from_config(tiny_config(family_name))
    budget, _, found = candidates(teacher, target, axes=axes, heads=True)
    assert_within(budget, found)


# --- held-out scoring and depth strategies (tiny models, no pruning needed) --------------------------------

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from tiny import tiny_model  # noqa: E402

from minitron.search import DepthChooser, HeldOut, layer_loss_rise  # noqa: E402


def heldout_ids(n=4, seq=16, seed=1):
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


def silence_layers(model, layers):
    """Zero the output projections of ``layers``: each then adds nothing to the residual stream."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) in layers:
                if "o_proj" in parts or "down_proj" in parts or "output_linear" in parts:
                    p.zero_()


def test_heldout_loss_equals_naive_cross_entropy_and_ignores_batching(family_name):
    model, ids = tiny_model(family_name), heldout_ids()
    with torch.no_grad():
        logits = model(ids).logits
    naive = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
    for batch_size in (1, 3, 4):
        assert HeldOut(model, ids, batch_size=batch_size).score(model, "loss") == pytest.approx(naive, rel=1e-5)
    assert HeldOut(model, ids, need_teacher=True).score(model, "kl") == pytest.approx(0.0, abs=1e-6)


def test_window_strategy_finds_the_silent_block(family_name):
    # A larger init than the default 0.02 so that the tiny models' logits are far from uniform and every
    # real layer visibly moves the KL.
    model = tiny_model(family_name, initializer_range=0.3)
    silence_layers(model, {1, 2})
    ids = heldout_ids()
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
    heldout = HeldOut(model, heldout_ids())
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


# --- ranking and the whole run on tiny checkpoints ---------------------------------------------------------

import random  # noqa: E402

from tiny import save_tiny, tiny_tokenizer  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from minitron.importance import compute_scores  # noqa: E402
from minitron.search import Ranking, Request, rank_candidates, run  # noqa: E402

WORDS = "the quick brown fox jumps over the lazy dog a small model learns from a big model by distillation".split()


def write_calib(path, docs=60, seed=0):
    rng = random.Random(seed)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(docs)) + "\n")
    return path


def tiny_checkpoint(tmp_path, family, **overrides):
    folder = tmp_path / f"{family}-teacher"
    save_tiny(family, folder, initializer_range=0.3, **overrides)
    tiny_tokenizer().save_pretrained(folder)
    return folder


class Calib:  # the fields of prune.Calibration that the search reads
    def __init__(self, data, samples=4, seq_len=16, batch_size=2, seed=0):
        self.data, self.samples, self.seq_len, self.batch_size, self.seed = data, samples, seq_len, batch_size, seed


def test_ranking_is_deterministic_for_a_seed_and_never_touches_the_teacher():
    teacher = tiny_model("llama", initializer_range=0.3)
    ids = heldout_ids(n=6, seq=16)
    scores = compute_scores(teacher, ids[:4], batch_size=2, show_progress=False)
    shape = Shape.from_config(teacher.config)
    shortlist = Request.parse(shape, target="0.6x", axes="width,depth").candidates()[:3]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    heldout = HeldOut(teacher, ids[4:], batch_size=2, need_teacher=True)
    depth = DepthChooser("window", teacher, scores, heldout, "kl")
    runs = [
        rank_candidates(teacher, shortlist, scores, heldout, rank_by="kl", depth=depth, search_steps=2,
                        train_blocks=ids[:4], lr=1e-3, batch_size=2, seed=seed)
        for seed in (0, 0, 1)
    ]  # fmt: skip
    first, again, other_seed = ([(r.candidate.shape, r.drop_layers, r.score) for r in ranked] for ranked in runs)
    assert first == again
    assert [s for *_, s in first] == sorted(s for *_, s in first)  # best (lowest) first
    assert {s for *_, s in first} != {s for *_, s in other_seed}  # the seed does reach the short distillation
    assert all(torch.equal(v, teacher.state_dict()[k]) for k, v in before.items())


def test_search_run_writes_the_best_candidate(family_name, tmp_path):
    src = tiny_checkpoint(tmp_path, family_name)
    shape = Shape.from_config(AutoModelForCausalLM.from_pretrained(src).config)
    request = Request.parse(shape, target="0.6x", axes="width,depth", prune_heads=True)
    out = tmp_path / "student"
    info = run(
        str(src), shape, request, Ranking(top_k=2, heldout_samples=2, rank_by="kl"), out=out,
        calibration=Calib(write_calib(tmp_path / "calib.txt")), show_progress=False,
    )  # fmt: skip
    record = json.loads((out / "search.json").read_text())
    plan = json.loads((out / "plan.json").read_text())
    chosen = record["chosen"]
    evaluated = [c for c in record["candidates"] if "rank" in c]
    assert len(evaluated) == 2 and chosen["score"] == min(c["score"] for c in evaluated)
    assert all(chosen[k] == plan["student"][k] for k in ("hidden", "ffn", "layers", "heads", "kv_heads", "experts"))
    assert plan["dropped_layers"] == chosen["drop_layers"] == info["dropped_layers"]
    student = AutoModelForCausalLM.from_pretrained(out)  # stock transformers, nothing custom
    assert sum(p.numel() for p in student.parameters()) == chosen["params"]
    assert abs(chosen["params"] - request.budget.total) <= request.budget.tolerance * request.budget.total
    assert record["ranking"]["heldout"]["follows_importance_blocks"] == 4
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left behind


# --- the CLI: `minitron prune --target` ----------------------------------------------------------------------


cli = minitron


def test_cli_dry_run_json_lists_the_published_llama_shapes(tmp_path):
    # A folder holding nothing but config.json: the dry run needs no weights.
    (tmp_path / "config.json").write_text((SHARED / "llama-3.1-8b" / "config.json").read_text())
    width = cli("prune", tmp_path, "--target", "4.5B", "--axes", "width", "--dry-run", "--json")
    assert width.returncode == 0, width.stderr
    info = json.loads(width.stdout)
    assert info["count"] == len(info["candidates"]) > 1
    assert any(
        all(c[k] == v for k, v in MINITRON_4B_WIDTH.items()) and c["params"] == 4_512_746_496 for c in info["candidates"]
    )
    assert all(abs(c["params"] - 4.5e9) <= 0.02 * 4.5e9 for c in info["candidates"])
    depth = json.loads(cli("prune", tmp_path, "--target", "4.5B", "--axes", "depth", "--dry-run", "--json").stdout)
    assert [(c["layers"], c["params"]) for c in depth["candidates"]] == [(16, 4_540_469_248)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]


def test_cli_dry_run_active_target_on_granite_moe():
    result = cli("prune", SHARED / "granite-3.1-1b-a400m-base", "--active-target", "300M", "--axes", "width,experts",
                 "--dry-run", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["candidates"] and all(abs(c["active_params"] - 3e8) <= 0.02 * 3e8 for c in info["candidates"])
    table = cli("prune", SHARED / "granite-3.1-3b-a800m-base", "--target", "2B", "--axes", "width,experts", "--dry-run")
    assert table.returncode == 0 and "candidates for 2.00B params" in table.stdout


@pytest.mark.parametrize(
    "args, needles",
    [
        (["--target", "3B", "--axes", "depth"], ["layers ≥ 16", "--limit layers="]),
        (["--target", "1x"], ["--target", "between 0 and 1"]),
        (["--target", "9B"], ["--target", "not smaller"]),
        (["--target", "4B", "--hidden-size", "3072"], ["--hidden-size", "either --target"]),
        (["--target", "4B", "--axes", "experts"], ["--axes experts", "no experts"]),
        (["--target", "4B", "--limit", "ffn=2"], ["--limit"]),
    ],
)
def test_cli_refusals_are_one_line_and_write_nothing(tmp_path, args, needles):
    out = tmp_path / "student"
    result = cli("prune", SHARED / "llama-3.1-8b", "-o", out, *args)
    assert_user_error(result, *needles)
    assert not list(tmp_path.iterdir())


def test_cli_search_end_to_end(tmp_path):
    src = tiny_checkpoint(tmp_path, "qwen2")
    calib = write_calib(tmp_path / "calib.txt")
    out = tmp_path / "student"
    args = ["prune", src, "--target", "0.6x", "--axes", "width,depth", "--calib", calib, "--samples", "4",
            "--seq-len", "16", "--heldout-samples", "2", "--top-k-candidates", "2", "--search-steps", "1", "-o", out]
    result = cli(*args, "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["search"]["ranking"]["search_steps"] == 1
    assert json.loads((out / "search.json").read_text()) == info["search"]
    assert json.loads((out / "plan.json").read_text())["student"]["hidden"] == info["search"]["chosen"]["hidden"]
    assert "--target 0.6x" in (out / "README.md").read_text()  # the command is in the model card
    again = cli(*args)  # the output exists: refused before any work, nothing changed
    assert_user_error(again, "already exists")


def test_one_candidate_from_saved_scores_needs_no_weights_loaded(tmp_path):
    src = tiny_checkpoint(tmp_path, "granitemoe")
    teacher = AutoModelForCausalLM.from_pretrained(src)
    compute_scores(teacher, heldout_ids(), batch_size=2, show_progress=False).save(tmp_path / "scores.safetensors")
    shape = Shape.from_config(teacher.config)
    request = Request.parse(shape, target="0.6x", axes="width,experts")
    with pytest.raises(UserError, match="--calib"):  # five candidates cannot be ranked without data
        run(str(src), shape, request, Ranking(), out=tmp_path / "a", scores_file=tmp_path / "scores.safetensors")
    run(str(src), shape, request, Ranking(top_k=1), out=tmp_path / "b", scores_file=tmp_path / "scores.safetensors",
        show_progress=False)  # fmt: skip
    record = json.loads((tmp_path / "b" / "search.json").read_text())
    assert record["chosen"]["score"] is None and record["chosen"]["hidden"] == request.candidates()[0].shape.hidden
    assert not (tmp_path / "a").exists()
    AutoModelForCausalLM.from_pretrained(tmp_path / "b")


# --- every candidate must be a checkpoint transformers accepts -------------------------------------------------


def test_llama_candidates_keep_hidden_a_multiple_of_the_heads():
    # The bundled teacher has 10 query heads and a hidden grid step of 16: hidden 224 or 208 would be on the
    # grid, but transformers 5's LlamaConfig refuses a hidden size that is not a multiple of the heads.
    from transformers import AutoConfig

    from minitron.assets import teacher_path
    from minitron.families import config_updates, read_config

    raw = read_config(teacher_path())
    teacher = Shape.from_config(raw)
    found = Request.parse(teacher, target="0.5x", axes="width,depth").candidates()
    assert found and all(c.shape.hidden % c.shape.heads == 0 for c in found)
    for c in found:  # each one builds a real config: a pruned checkpoint of it loads
        fields = {**raw, **config_updates(teacher, c.shape)}
        fields.pop("model_type")
        AutoConfig.for_model("llama", **fields)
    with pytest.raises(UserError, match="multiple of the 10 query heads"):
        from minitron.plan import student_shape

        student_shape(teacher, hidden=224)

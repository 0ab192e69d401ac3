"""Recipes: every shipped one validates; a bad one fails before any training with one line and exit 2."""

import math
from pathlib import Path

import pytest
import yaml
from clirun import assert_user_error, minitron
from tiny import save_tiny, tiny_tokenizer

from minitron.errors import UserError
from minitron.recipe import apply_override, load_recipe, validate

REPO = Path(__file__).parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
TINY = REPO / "recipes" / "tiny-cpu.yaml"
DATA = REPO / "tests" / "data" / "shakespeare-8k.txt"


def save_checkpoint(path, model_type="llama", seed=0, tokenizer_vocab=128, **overrides):
    save_tiny(model_type, path, seed=seed, **overrides)
    tiny_tokenizer(tokenizer_vocab).save_pretrained(path)
    return path


def cli(*args, cwd=REPO):
    return minitron("distill", *args, cwd=cwd)


# --- the shipped recipes --------------------------------------------------------------------------------------


def test_the_paper_models_have_recipes():
    names = {p.stem for p in RECIPES}
    assert {
        "llama-3.1-minitron-4b-width",
        "llama-3.1-minitron-4b-depth",
        "llama-3.1-8b-teacher-correction",
        "granite-3.1-8b-to-2b",
        "granite-3.1-3b-a800m-to-1b-a400m",
        "powerlm-3b-from-granite-3.1-8b",
        "nemotron-4-15b-to-minitron-8b",
        "qwen3-8b-to-4b-width",
        "tiny-cpu",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_shipped_recipe_validates_and_opens_with_its_commands(path):
    recipe = load_recipe(path)  # structural: hub ids and missing local inputs are checked when a run starts
    assert recipe.steps() >= 1
    header = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        header.append(line)
    assert header, "a recipe opens with a comment"
    assert any("minitron.cli distill" in line or "minitron distill" in line for line in header)
    assert any(path.name in line for line in header), "the command names this recipe"


@pytest.mark.parametrize("name", ["llama-3.1-minitron-4b-width", "llama-3.1-minitron-4b-depth"])
def test_minitron_4b_recipes_carry_the_published_hyperparameters(name):
    recipe = load_recipe(REPO / "recipes" / f"{name}.yaml")
    assert (recipe.optimizer.lr, recipe.optimizer.min_lr, recipe.optimizer.warmup_steps) == (1e-4, 1e-5, 40)
    assert recipe.optimizer.schedule == "cosine"
    assert (recipe.batch.global_, recipe.data.seq_len, recipe.budget.tokens) == (1152, 8192, 94_000_000_000)
    assert (recipe.loss.kd, recipe.loss.temperature, recipe.loss.lm, recipe.loss.hidden) == (1.0, 1.0, 0.0, None)
    assert recipe.steps() == math.ceil(94e9 / (1152 * 8192)) == 9961
    assert recipe.batch.accumulation_for(8) == 144


def test_minitron_8b_recipe_distils_94b_tokens_on_logits_alone():
    recipe = load_recipe(REPO / "recipes" / "nemotron-4-15b-to-minitron-8b.yaml")
    assert (recipe.loss.kd, recipe.loss.temperature, recipe.loss.lm, recipe.loss.hidden) == (1.0, 1.0, 0.0, None)
    assert (recipe.data.seq_len, recipe.budget.tokens) == (4096, 94_000_000_000)
    assert recipe.steps() == math.ceil(94e9 / (recipe.batch.global_ * 4096))


def test_teacher_correction_is_lm_only_at_a_fifth_of_the_peak_lr():
    recipe = load_recipe(REPO / "recipes" / "llama-3.1-8b-teacher-correction.yaml")
    assert recipe.teacher is None and recipe.loss.kd == 0 and recipe.loss.lm == 1
    assert recipe.optimizer.lr == pytest.approx(3e-4 / 5)  # Llama-3.1-8B pre-trained at a 3e-4 peak


# --- overrides and the schema's rules -------------------------------------------------------------------------


def test_overrides_set_dotted_keys_with_yaml_values():
    recipe = load_recipe(
        TINY,
        ["optimizer.lr=3e-5", "optimizer.min_lr=0", "batch.accumulation=null", "loss.hidden.pairs=[[1, 2]]", "precision=bf16", "seed=7"],
    )
    assert recipe.optimizer.lr == 3e-5 and recipe.batch.accumulation is None
    assert recipe.loss.hidden.pairs == [(1, 2)] and recipe.loss.hidden.kind == "cosine"
    assert recipe.precision == "bf16" and recipe.seed == 7
    # A null section is filled by an override of one of its keys.
    data = {"teacher": None}
    apply_override(data, "teacher.path=/x")
    assert data == {"teacher": {"path": "/x"}}


@pytest.mark.parametrize("bad", ["optimizer.lr", "=3", "optimizer..lr=3"])
def test_malformed_override_is_a_user_error(bad):
    with pytest.raises(UserError, match="key=value"):
        load_recipe(TINY, [bad])


@pytest.mark.parametrize(
    "override,needles",
    [
        ("optimizer.lrr=1", ["optimizer.lrr", "unknown key 'lrr'", "allowed here: name, lr, min_lr"]),
        ("batch.micro=two", ["batch.micro", "valid integer", "'two'"]),
        ("precision=fp16", ["precision", "'bf16' or 'fp32'", "'fp16'"]),
        ("optimizer.min_lr=1", ["min_lr", "above optimizer.lr"]),
        ("budget.tokens=1000", ["budget", "exactly one of budget.steps and budget.tokens"]),
        ("teacher=null", ["teacher is null but loss.kd > 0"]),
        ("loss.hidden={pairs: [[1, 1]], kind: l1}", ["loss.hidden.kind", "'cosine' or 'mse'", "'l1'"]),
    ],
)
def test_schema_errors_name_the_key_the_value_and_what_is_allowed(override, needles):
    with pytest.raises(UserError) as e:
        load_recipe(TINY, [override])
    line = e.value.line()
    assert "\n" not in line and str(TINY) in line
    for needle in needles:
        assert needle in line


def test_batch_arithmetic_is_checked_against_the_number_of_processes():
    recipe = load_recipe(TINY, ["batch.micro=2", "batch.global=8"])
    assert recipe.batch.accumulation_for(1) == 4 and recipe.batch.accumulation_for(2) == 2
    with pytest.raises(UserError, match="not a multiple"):
        recipe.batch.accumulation_for(3)
    fixed = load_recipe(TINY, ["batch.micro=2", "batch.accumulation=2", "batch.global=8"])
    assert fixed.batch.accumulation_for(2) == 2
    with pytest.raises(UserError, match="not global 8"):
        fixed.batch.accumulation_for(1)


def test_budget_in_tokens_becomes_steps():
    recipe = load_recipe(TINY, ["budget.steps=null", "budget.tokens=1000"])  # global 4 × seq 32 = 128 a step
    assert recipe.steps() == 8


def test_resolved_recipe_round_trips():
    recipe = load_recipe(TINY, ["optimizer.lr=1e-3"])
    assert validate(yaml.safe_load(recipe.to_yaml())) == recipe


# --- the command line: one line, exit 2, nothing written ----------------------------------------------------------


def test_dry_run_prints_the_resolved_recipe(tmp_path):
    teacher = save_checkpoint(tmp_path / "teacher")
    result = cli(TINY, "--dry-run", f"teacher.path={teacher}", f"student.path={teacher}", f"data.source={DATA}",
                 "optimizer.lr=1e-3", f"output.dir={tmp_path / 'run'}")  # fmt: skip
    assert result.returncode == 0, result.stderr
    printed = validate(yaml.safe_load(result.stdout))
    assert printed.optimizer.lr == 1e-3 and printed.teacher.path == str(teacher)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "run, extra, needles",
    [("exists", [], ["run folder already exists", "--resume"]),
     ("/proc/self/run", [], ["/proc/self", "cannot write here"]),
     ("missing", ["--resume"], ["nothing to resume"])],
)
def test_dry_run_refuses_the_run_folder_the_run_would_refuse(tmp_path, run, extra, needles):
    teacher = save_checkpoint(tmp_path / "teacher")
    (tmp_path / "exists").mkdir()
    run_dir = run if run.startswith("/") else tmp_path / run
    result = cli(TINY, "--dry-run", *extra, f"teacher.path={teacher}", f"student.path={teacher}",
                 f"data.source={DATA}", f"output.dir={run_dir}")  # fmt: skip
    assert_user_error(result, *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "teacher"]


@pytest.mark.parametrize(
    "override,needles",
    [("optimizer.lrr=1", ["optimizer.lrr", "unknown key"]), ("batch.micro=two", ["batch.micro", "valid integer"]),
     ("budget.steps=true", ["budget.steps", "valid integer", "True"]), ("batch.micro=2.0", ["batch.micro", "2.0"])],
)
def test_cli_schema_errors(tmp_path, override, needles):
    assert_user_error(cli(TINY, override, f"output.dir={tmp_path / 'run'}"), *needles)
    assert not (tmp_path / "run").exists()


def test_cli_missing_recipe_file(tmp_path):
    assert_user_error(cli(tmp_path / "nope.yaml"), "no such recipe file")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "teacher": save_checkpoint(root / "teacher"),
        "student": save_checkpoint(root / "student", seed=1, num_hidden_layers=2),
        "other-tokenizer": save_checkpoint(root / "other-tokenizer", seed=1, tokenizer_vocab=100),
        "other-vocab": save_checkpoint(root / "other-vocab", seed=1, vocab_size=96),
    }


@pytest.mark.parametrize(
    "case,needles",
    [
        ("missing-teacher", ["teacher.path", "no such file or folder"]),
        ("missing-data", ["data.source", "no such data file"]),
        ("other-tokenizer", ["tokenizers differ", "128 vs 100 tokens"]),
        ("other-vocab", ["vocab_size 128", "vocab_size 96"]),
    ],
)
def test_run_refuses_bad_inputs_before_training(tmp_path, checkpoints, case, needles):
    teacher, student, data = checkpoints["teacher"], checkpoints["student"], DATA
    if case == "missing-teacher":
        teacher = tmp_path / "no-teacher"
    elif case == "missing-data":
        data = tmp_path / "no-data.txt"
    else:
        student = checkpoints[case]
    run = tmp_path / "run"
    result = cli(TINY, f"teacher.path={teacher}", f"student.path={student}", f"data.source={data}",
                 f"output.dir={run}", f"data.cache_dir={tmp_path / 'cache'}")  # fmt: skip
    assert_user_error(result, *needles)
    assert not run.exists() and not (tmp_path / "cache").exists()


# --- hostile recipes: each refused at validation with one line naming the key -------------------------------------


@pytest.mark.parametrize(
    "override,needles",
    [
        ("seed=-1", ["seed", "greater than or equal to 0", "-1"]),
        ("seed=4294967296", ["seed", "less than or equal to 4294967295"]),  # numpy: 0 … 2**32 − 1
        ("optimizer.lr=.inf", ["optimizer.lr", "finite number", "inf"]),
        ("optimizer.lr=1.0e+400", ["optimizer.lr", "finite number"]),  # YAML reads it as infinity
        ("loss.temperature=.inf", ["loss.temperature", "finite number"]),
        ("optimizer.betas=[-.inf, 0.9]", ["optimizer.betas.0", "finite number"]),
        ("optimizer.grad_clip=.inf", ["optimizer.grad_clip", "finite number"]),
    ],
)
def test_out_of_range_seeds_and_infinite_floats_are_refused_at_validation(override, needles):
    with pytest.raises(UserError) as e:
        load_recipe(TINY, [override])
    line = e.value.line()
    assert "\n" not in line
    for needle in needles:
        assert needle in line, line
    assert load_recipe(TINY, ["seed=4294967295"]).seed == 2**32 - 1


def test_nested_yaml_aliases_are_answered_at_once_with_a_short_line(tmp_path):
    # "Billion laughs": 10 × 20**11 items once expanded; a plain repr() of the bad value never ends.
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 20)}]" for i in range(1, 12)]
    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("\n".join(lines) + "\n" + TINY.read_text().replace("path: runs/tiny/teacher", "path: *a11"))
    result = minitron("distill", recipe, "--dry-run", cwd=REPO, timeout=60)
    assert_user_error(result, "teacher.path", "valid string")
    assert len(result.stderr) < 300, result.stderr


def test_a_key_given_twice_is_refused_with_its_line(tmp_path):
    text = TINY.read_text()
    twice = tmp_path / "twice.yaml"
    twice.write_text(text + "optimizer:\n  lr: 1.0\n")  # a second section would replace the first whole
    with pytest.raises(UserError) as e:
        load_recipe(twice)
    line = e.value.line()
    first = text.splitlines().index("optimizer:") + 1
    assert "duplicate key 'optimizer'" in line and f"line {len(text.splitlines()) + 1}" in line, line
    assert f"first at line {first}" in line and str(twice) in line
    twice.write_text(text + "seed: 3\n")
    with pytest.raises(UserError, match="duplicate key 'seed'"):
        load_recipe(twice)
    # A YAML merge key is not a duplicate: the keys beside it override the merged ones, by design.
    merged = tmp_path / "merged.yaml"
    merged.write_text(text.replace("optimizer:\n", "optimizer:\n  <<: {lr: 1.0, eps: 1.0e-6}\n"))
    recipe = load_recipe(merged)
    assert recipe.optimizer.lr == 3e-3 and recipe.optimizer.eps == 1e-6

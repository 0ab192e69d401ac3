"""Distillation recipes: the schema of ``recipes/*.yaml``, ``key=value`` overrides, and the checks on inputs.

A recipe is YAML validated by small pydantic models, one per concern, each with ``extra="forbid"`` so that
a typo is an error rather than a silently ignored default. Every validation error becomes one
:class:`~minitron.errors.UserError` line that names the key path, the bad value and what is allowed.

:func:`check_inputs` then looks at what the recipe points to (checkpoints, tokenizers, data) and refuses
anything that would fail later (missing files, teacher and student with different vocabularies) before a
single weight is loaded.
"""

from __future__ import annotations

import math
import reprlib
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, Strict, ValidationError, model_validator

from minitron.errors import UserError
from minitron.inputs import read_text

# --- the schema -----------------------------------------------------------------------------------------------

# Every count is Strict: pydantic would otherwise take `steps: true` for 1 and `2.0` for 2.
_Layer = Annotated[int, Strict(), Field(ge=0)]


class _Section(BaseModel):
    # frozen: a validated recipe is a value; the loop must not tweak it behind the user's back.
    # allow_inf_nan=False: every float is finite (NaN already fails each bound; `lr: .inf` or `1e400` would not,
    # and would load both models only to diverge at the first step).
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class Teacher(_Section):
    path: str
    """Checkpoint folder or hub id of the model the student learns from (kept frozen, in eval mode)."""


class Student(_Section):
    path: str
    """Checkpoint folder (e.g. the output of ``minitron prune``) or hub id of the model being trained."""
    activation_checkpointing: bool = False
    """Recompute each decoder layer in backward: less activation memory for ~30% more compute."""


class Data(_Section):
    source: str
    """A .txt / .jsonl / .parquet file, a folder of them, or a ``datasets`` hub name (``name:config``)."""
    split: str = "train"
    """Split read from a hub dataset."""
    seq_len: Annotated[int, Strict(), Field(ge=2)]
    """Tokens per packed block: documents are joined with EOS and cut into blocks of this length."""
    cache_dir: str | None = None
    """Where tokenized data is cached (default ``$MINITRON_CACHE`` or ``~/.cache/minitron``)."""


class Hidden(_Section):
    pairs: Annotated[list[tuple[_Layer, _Layer]], Field(min_length=1)]
    """``[student_layer, teacher_layer]`` pairs of hidden states: 0 = the embeddings, i = the residual stream
    after decoder layer i (1-based), always before the final norm, the last layer included."""
    kind: Literal["cosine", "mse"] = "cosine"
    """Distance per token: 1 − cosine similarity, or mean squared difference."""


class Loss(_Section):
    kd: Annotated[float, Field(ge=0)] = 1.0
    """Weight of the forward KL from the teacher's logits to the student's."""
    temperature: Annotated[float, Field(gt=0)] = 1.0
    """Softmax temperature τ of both models' logits (the KL is multiplied by τ²); 2408.11796 uses 1."""
    lm: Annotated[float, Field(ge=0)] = 0.0
    """Weight of the student's next-token cross entropy on the data."""
    hidden: Hidden | None = None
    """Optional intermediate-state losses, weighted dynamically to the logit loss's size (2407.14679)."""
    chunk_size: Annotated[int, Strict(), Field(ge=1)] = 1024
    """Tokens per chunk of the fused output-head losses (memory ∝ chunk_size × vocab)."""

    @model_validator(mode="after")
    def _something_to_learn(self) -> "Loss":
        if self.kd == 0 and self.lm == 0:
            raise ValueError("loss.kd and loss.lm are both 0: nothing to train on; set one of them > 0")
        return self


class Optimizer(_Section):
    name: Literal["adamw"] = "adamw"
    lr: Annotated[float, Field(gt=0)]
    """Peak learning rate, reached after the warm-up."""
    min_lr: Annotated[float, Field(ge=0)] = 0.0
    """Learning rate at the end of the cosine decay."""
    warmup_steps: Annotated[int, Strict(), Field(ge=0)] = 0
    """Linear warm-up from 0 to ``lr`` over this many optimizer steps."""
    schedule: Literal["cosine", "constant"] = "cosine"
    weight_decay: Annotated[float, Field(ge=0)] = 0.0
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    eps: Annotated[float, Field(gt=0)] = 1e-8
    grad_clip: Annotated[float, Field(gt=0)] | None = 1.0
    """Clip the global gradient norm to this; ``null`` only measures it."""

    @model_validator(mode="after")
    def _min_below_peak(self) -> "Optimizer":
        if self.min_lr > self.lr:
            raise ValueError(f"optimizer.min_lr ({self.min_lr}) is above optimizer.lr ({self.lr})")
        return self


class Batch(_Section):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False, populate_by_name=True)

    micro: Annotated[int, Strict(), Field(ge=1)]
    """Sequences per forward pass on each process."""
    accumulation: Annotated[int, Strict(), Field(ge=1)] | None = None
    """Micro-batches per optimizer step; ``null``: derived as global / (micro × processes)."""
    global_: Annotated[int, Strict(), Field(ge=1, alias="global")]
    """Sequences per optimizer step over all processes and accumulation steps."""

    def accumulation_for(self, world_size: int) -> int:
        """Micro-batches per step on each of ``world_size`` processes; a user error if they don't add up."""
        per_pass = self.micro * world_size
        if self.accumulation is None:
            if self.global_ % per_pass:
                raise UserError(
                    f"global batch {self.global_} is not a multiple of micro {self.micro} × {world_size} processes",
                    where="batch.global",
                    fix="change batch.global, batch.micro or the number of processes",
                )
            return self.global_ // per_pass
        if self.accumulation * per_pass != self.global_:
            raise UserError(
                f"micro {self.micro} × accumulation {self.accumulation} × {world_size} processes "
                f"= {self.accumulation * per_pass}, not global {self.global_}",
                where="batch",
                fix="set batch.accumulation=null to derive it, or make the product equal batch.global",
            )
        return self.accumulation


class Budget(_Section):
    steps: Annotated[int, Strict(), Field(ge=1)] | None = None
    """Optimizer steps to train for."""
    tokens: Annotated[int, Strict(), Field(ge=1)] | None = None
    """Tokens to train on; steps = ceil(tokens / (global batch × seq_len))."""

    @model_validator(mode="after")
    def _exactly_one(self) -> "Budget":
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of budget.steps and budget.tokens")
        return self


class Eval(_Section):
    every: Annotated[int, Strict(), Field(ge=0)] = 0
    """Evaluate on held-out blocks every N steps (also before the first and after the last); 0: only those."""
    blocks: Annotated[int, Strict(), Field(ge=1)] = 8
    """Packed blocks held out of training for evaluation (LM loss, and KL to the teacher)."""


class Checkpoint(_Section):
    every: Annotated[int, Strict(), Field(ge=0)] = 0
    """Save a resumable checkpoint every N steps; 0: never (the final model is always saved)."""
    keep: Annotated[int, Strict(), Field(ge=1)] = 2
    """How many of the newest checkpoints to keep."""


class Output(_Section):
    dir: str
    """Run folder: ``recipe.yaml``, ``metrics.jsonl``, ``checkpoints/`` and the final model in ``final/``."""
    overwrite: bool = False
    """Replace an existing run folder instead of refusing to start."""


class Recipe(_Section):
    """A distillation run: who teaches whom, on what data, with which loss, optimizer and budget."""

    teacher: Teacher | None
    """``null``: no teacher, LM loss only (teacher correction fine-tunes a model this way)."""
    student: Student
    data: Data
    loss: Loss = Loss()
    optimizer: Optimizer
    batch: Batch
    budget: Budget
    precision: Literal["bf16", "fp32"] = "bf16"
    """bf16: bf16 compute with float32 master weights and optimizer state; fp32: everything float32."""
    eval: Eval = Eval()
    checkpoint: Checkpoint = Checkpoint()
    output: Output
    seed: Annotated[int, Strict(), Field(ge=0, le=2**32 - 1)] = 0
    """Seeds Python, numpy and torch; numpy takes 0 to 2**32 − 1."""

    @model_validator(mode="after")
    def _teacher_needed(self) -> "Recipe":
        if self.teacher is None and self.loss.kd > 0:
            raise ValueError("teacher is null but loss.kd > 0; set loss.kd: 0 and loss.lm > 0 for LM-only training")
        if self.teacher is None and self.loss.hidden is not None:
            raise ValueError("teacher is null but loss.hidden is set; hidden-state losses need a teacher")
        return self

    def steps(self) -> int:
        """Optimizer steps of the whole run."""
        if self.budget.steps is not None:
            return self.budget.steps
        return math.ceil(self.budget.tokens / (self.batch.global_ * self.data.seq_len))

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json", by_alias=True), sort_keys=False)


# --- reading a recipe ------------------------------------------------------------------------------------------


def load_recipe(path: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> Recipe:
    """Read, override and validate a recipe; every problem is one :class:`UserError` line."""
    path = Path(path)
    if not path.is_file():
        what = ("a folder, not a recipe file" if path.is_dir() else
                "neither a file nor a folder (a pipe or a device?)" if path.exists() else "no such recipe file")  # fmt: skip
        raise UserError(what, where=str(path), fix="pass a YAML file, e.g. recipes/tiny-cpu.yaml")
    try:
        data = yaml.load(read_text(path), Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        fix = "keep one of the two" if isinstance(e, _DuplicateKey) else None
        raise UserError(f"not valid YAML{at} ({getattr(e, 'problem', None) or e})", where=str(path), fix=fix) from None
    if not isinstance(data, dict):
        raise UserError("a recipe must be a YAML mapping of sections", where=str(path))
    for override in overrides:
        apply_override(data, override)
    return validate(data, where=str(path))


def apply_override(data: dict[str, Any], override: str) -> None:
    """``optimizer.lr=3e-5`` → ``data["optimizer"]["lr"] = 3e-5`` (the value is read as YAML)."""
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise UserError("an override must look like key=value", where=override, fix="e.g. optimizer.lr=3e-5")
    try:
        value = yaml.load(text, Loader=_Loader) if text else None
    except yaml.YAMLError:
        value = text  # an unparseable value is a string; the schema decides whether a string is allowed
    *parents, leaf = key.split(".")
    node = data
    for part in parents:
        # A missing or null section (``teacher: null``) becomes a fresh one that the override fills in.
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


class _DuplicateKey(yaml.constructor.ConstructorError):
    pass


class _Loader(yaml.SafeLoader):
    """``yaml.safe_load``'s loader, except that a key given twice in one mapping is an error: YAML keeps the
    last one silently, so a second ``optimizer:`` section would replace the first whole."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: keys given beside it override it, by design
                continue
            key = self.construct_object(key_node, deep=deep)
            try:
                if key in first:
                    raise _DuplicateKey(problem=f"duplicate key {_short(key)}, first at line {first[key]}",
                                        problem_mark=key_node.start_mark)  # fmt: skip
                first[key] = key_node.start_mark.line + 1
            except TypeError:  # an unhashable key: the base class refuses it with its own message
                pass
        return super().construct_mapping(node, deep=deep)


def validate(data: dict[str, Any], where: str = "recipe") -> Recipe:
    try:
        return Recipe.model_validate(data)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        first = errors[0]
        more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
        what, fix = _describe(first)
        key = _key_path(first["loc"])
        raise UserError(what + more, where=f"{where}: {key}" if key else where, fix=fix) from None


def _key_path(loc: tuple) -> str:
    # pydantic puts union-branch names ("float", "none", "function-after[...]") into the location.
    parts = [str(p) for p in loc if isinstance(p, int) or not _is_branch(str(p))]
    return ".".join("global" if p == "global_" else p for p in parts)


def _is_branch(part: str) -> bool:
    return part in ("none", "int", "float", "str", "bool", "list", "tuple", "constrained-float") or "[" in part


def _describe(error: dict[str, Any]) -> tuple[str, str | None]:
    kind, value = error["type"], error.get("input")
    if kind == "extra_forbidden":
        allowed = _allowed_keys(error["loc"][:-1])
        return f"unknown key {error['loc'][-1]!r}", f"allowed here: {', '.join(allowed)}" if allowed else None
    if kind == "missing":
        if isinstance(error["loc"][-1], int):
            return "too few items", "give a pair, e.g. [0.9, 0.95]" if "betas" in error["loc"] else None
        return "required key is missing", None
    if kind == "value_error":
        return str(error["msg"]).removeprefix("Value error, "), None
    return f"{error['msg']}, got {_short(value)}", None


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = Recipe
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part) if isinstance(part, str) else None
        if field is None:
            return []
        model = _model_in(field.annotation)
        if model is None:
            return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):  # Optional[Model]
        if isinstance(arg, type) and issubclass(arg, BaseModel):
            return arg
    return None


def _short(value: Any) -> str:
    # reprlib stops after a few items and levels: nested YAML aliases ("billion laughs") make a value of a
    # few lines that a plain repr() would spend forever spelling out in full.
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict, _REPR.maxset = 3, 4, 4, 4, 4
_REPR.maxstring = _REPR.maxother = 60


# --- checking what the recipe points to ------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    """``org/name`` that is not an existing path: a Hugging Face hub id."""
    from minitron.inputs import is_local

    return not is_local(name)


def check_paths(recipe: Recipe) -> list[str]:
    """Refuse local paths that do not exist (cheap: no model or tokenizer is loaded).

    Returns notes on what could not be checked offline (hub ids).
    """
    from minitron.data import looks_local
    from minitron.inputs import read_config

    notes = []
    for role, section in (("teacher", recipe.teacher), ("student", recipe.student)):
        if section is None:
            continue
        if is_hub_id(section.path):
            notes.append(f"{role}.path {section.path} is a hub id: checked when the run starts")
            continue
        try:
            read_config(section.path)
        except UserError as e:
            raise UserError(e.what, where=f"{role}.path {e.where}", fix=e.fix) from None
    source = recipe.data.source
    if Path(source).exists():
        pass
    elif looks_local(source):
        raise UserError("no such data file or folder", where=f"data.source {source}", fix="check the path")
    else:
        notes.append(f"data.source {source} is a hub dataset: read when the run starts")
    return notes


def check_inputs(recipe: Recipe, *, trust_remote_code: bool = False) -> tuple[Any, Any | None, Any]:
    """Everything that must hold before training: paths, configs, and one shared vocabulary.

    Returns ``(student_config, teacher_config or None, tokenizer)``. The tokenizer is the student's, or
    the teacher's when the student folder has none (a pruned checkpoint written without one).
    """
    from minitron.families import Shape
    from minitron.inputs import check_vocab, check_weights, is_local, load_config

    def checked(role: str, path: str) -> Any:
        # Weights too, from their headers: a broken teacher is refused now, not after tokenizing the data.
        config = load_config(path, trust_remote_code=trust_remote_code)
        if is_local(path):
            try:
                check_weights(path, Shape.from_config(config))
            except UserError as e:
                raise UserError(e.what, where=f"{role}.path {e.where}", fix=e.fix) from None
        return config

    check_paths(recipe)
    student_config = checked("student", recipe.student.path)
    teacher_config = None
    if recipe.teacher is not None:
        teacher_config = checked("teacher", recipe.teacher.path)
        if teacher_config.vocab_size != student_config.vocab_size:
            raise UserError(
                f"teacher vocab_size {teacher_config.vocab_size} ≠ student vocab_size {student_config.vocab_size}",
                where="teacher.path / student.path",
                fix="distill between models with the same vocabulary (the KL compares full distributions)",
            )
    student_tokenizer = _tokenizer(recipe.student.path, trust_remote_code)
    teacher_tokenizer = _tokenizer(recipe.teacher.path, trust_remote_code) if recipe.teacher else None
    tokenizer = student_tokenizer or teacher_tokenizer
    if tokenizer is None:
        raise UserError(
            "no tokenizer found", where=recipe.student.path, fix="save the tokenizer with the checkpoint"
        )
    if student_tokenizer is not None and teacher_tokenizer is not None:
        _same_vocabulary(teacher_tokenizer, student_tokenizer)
    check_vocab(tokenizer, student_config.vocab_size, fix="save the tokenizer the model was trained with beside it",
                where=recipe.student.path if student_tokenizer is not None else recipe.teacher.path)  # fmt: skip
    return student_config, teacher_config, tokenizer


def _tokenizer(path: str, trust_remote_code: bool) -> Any | None:
    """The tokenizer saved with a checkpoint, through the checked reader; None for a local folder without one."""
    from minitron.inputs import load_tokenizer

    local = Path(path)
    if local.is_dir() and not any((local / name).exists() for name in _TOKENIZER_FILES):
        return None
    return load_tokenizer(path, trust_remote_code=trust_remote_code)


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def _same_vocabulary(teacher: Any, student: Any) -> None:
    teacher_vocab, student_vocab = teacher.get_vocab(), student.get_vocab()
    if teacher_vocab == student_vocab:
        return
    differ = sorted(set(teacher_vocab.items()) ^ set(student_vocab.items()), key=lambda kv: (kv[1], kv[0]))
    token, token_id = differ[0]
    owner = "teacher" if teacher_vocab.get(token) == token_id else "student"
    raise UserError(
        f"teacher and student tokenizers differ ({len(teacher_vocab)} vs {len(student_vocab)} tokens; "
        f"e.g. {token!r} = id {token_id} only in the {owner}'s)",
        where="teacher.path / student.path",
        fix="distill only between models that share one tokenizer",
    )

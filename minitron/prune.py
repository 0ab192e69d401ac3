"""Applying a :class:`~minitron.plan.Plan` to weights: in memory, or streamed checkpoint to checkpoint.

Both paths cut each tensor with the same function, :func:`slice_tensor`, driven by the family tensor table
(:mod:`minitron.families`): every dimension of every tensor is named by its axis, and each axis has its kept
indices in the plan. Nothing here knows a family by name.

The streamed path (:func:`prune_checkpoint`) never holds more than one teacher tensor and its pruned copy:
teacher shards are opened lazily one tensor at a time (the memory map is closed again at once, so its pages
do not stay in the process), and the student's shards are written tensor by tensor. It can do so because
the student's tensor names, dtypes and shapes, and so each shard's safetensors header, are known from the
plan before any weight is read; :mod:`minitron.shards` writes them.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from minitron.artifacts import atomic_dir, check_output_dir
from minitron.errors import UserError
from minitron.families import LM_HEAD, Shape, Tensor, config_updates
from minitron.inputs import INDEX_FILE, Stored, all_tensors, check_weights, read_config, stored_layout
from minitron.plan import LayerPlan, Plan
from minitron.shards import DTYPES, shard_groups, write_safetensors

DEFAULT_SHARD_BYTES = 5 * 10**9  # what save_pretrained and the Llama / Granite checkpoints use
# Files that travel with a checkpoint unchanged: tokenizer, generation settings and the licence terms that
# the teacher's licence (e.g. Llama 3.1's) asks to pass on with derivatives.
COPIED = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json",
    "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json",
    "LICENSE*", "USE_POLICY*", "NOTICE*",
)  # fmt: skip


# --- cutting one tensor ----------------------------------------------------------------------------------------


def _channels(units: list[int], width: int) -> list[int]:
    """Head indices → the channel indices of those heads (each head is ``width`` consecutive channels)."""
    return [u * width + j for u in units for j in range(width)]


def _index(values: list[int], size: int) -> torch.Tensor | None:
    """A LongTensor of kept indices, or ``None`` when everything is kept in order (no copy needed)."""
    return None if list(values) == list(range(size)) else torch.tensor(values, dtype=torch.long)


def axis_indices(plan: Plan, layer: LayerPlan | None, expert: int | None = None) -> dict[str, torch.Tensor | None]:
    """Kept indices per axis for a tensor of ``layer`` (``None`` for global tensors); for MoE tensors, of the
    ``expert``-th *kept* expert, since each expert keeps its own neurons."""
    t = plan.teacher
    # vocab and head_dim are never pruned: pruning removes whole heads, so each keeps its head_dim channels.
    index: dict[str, torch.Tensor | None] = {"vocab": None, "head_dim": None, "hidden": _index(plan.hidden, t.hidden)}
    if layer is None:
        return index
    index["q"] = _index(_channels(layer.heads, t.head_dim), t.heads * t.head_dim)
    index["kv"] = _index(_channels(layer.kv_groups, t.head_dim), t.kv_heads * t.head_dim)
    neurons = layer.neurons[expert] if expert is not None else layer.neurons
    index["ffn"] = _index(neurons, t.ffn)
    # gate ‖ up fused along one dimension: the same neurons in both halves.
    index["ffn2"] = None if index["ffn"] is None else torch.cat([index["ffn"], index["ffn"] + t.ffn])
    return index


# Integer dtypes of each item size: numpy has no bfloat16 or float8, but gathering moves bytes only.
_SAME_SIZE_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _select(tensor: torch.Tensor, axes: tuple[str, ...], index: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """Keep ``index[axis]`` along each dimension (``None``: keep all), leading dimension first.

    Taking rows first matters when ``tensor`` is a memory map: the pages of dropped rows are never read.
    On CPU the gather runs in numpy: torch's ``index_select`` along a non-leading dimension (the hidden
    columns of nearly every weight) is 2-3× slower than ``numpy.take``, which made column gathering the
    largest cost of streaming an 8B checkpoint (benchmarks/prune_stream.py). Both copy bytes only, so the
    results are identical.
    """
    picks = [(dim, index[axis]) for dim, axis in enumerate(axes) if index[axis] is not None]
    if tensor.device.type != "cpu":
        for dim, kept in picks:
            tensor = tensor.index_select(dim, kept)
        return tensor
    if not picks:
        return tensor
    import numpy as np

    array = tensor.detach().view(_SAME_SIZE_INT[tensor.element_size()]).numpy()
    for dim, kept in picks:
        array = np.take(array, kept.numpy(), axis=dim)
    return torch.from_numpy(array).view(tensor.dtype)


def slice_tensor(
    spec: Tensor, read: Callable[[Any], torch.Tensor], plan: Plan, layer: LayerPlan | None, expert: int | None = None
) -> torch.Tensor:
    """The student's copy of one teacher tensor.

    ``read(key)`` returns ``teacher_tensor[key]`` for an int or ``slice(None)``: a parameter's
    ``__getitem__`` in memory, a safetensors slice on disk. Expert tensors are read one expert at a time, so
    only kept experts are ever loaded. A per-expert tensor (one file tensor per expert) is cut as the
    ``expert``-th kept expert.
    """
    if spec.per_expert:
        return _select(read(slice(None)), spec.axes[1:], axis_indices(plan, layer, expert))
    if spec.axes[0] == "experts":
        parts = [
            _select(read(expert), spec.axes[1:], axis_indices(plan, layer, k)) for k, expert in enumerate(layer.experts)
        ]
        return torch.stack(parts)
    tensor = _select(read(slice(None)), spec.axes, axis_indices(plan, layer))
    scale = norm_scale(plan, spec, layer)
    return tensor if scale is None else (tensor.float() * scale).to(tensor.dtype)


def norm_scale(plan: Plan, spec: Tensor, layer: LayerPlan | None) -> float | None:
    """The plan's factor for ``spec`` when it is the weight of a norm over the embedding channels
    (:func:`minitron.plan.norm_scales`), else ``None``."""
    if not plan.norm_scale:
        return None
    norms = plan.teacher.family.layer_norms
    if layer is None:
        return plan.norm_scale[-1] if spec.name == "model.norm.weight" else None
    name = spec.name.removesuffix(".weight")
    if name == spec.name or name not in norms:
        return None
    return plan.norm_scale[layer.source * len(norms) + norms.index(name)]


@dataclass(frozen=True)
class Item:
    """One student tensor: its name, the teacher tensor it is cut from, its axes, its layer and, for a tensor
    stored per expert, which kept expert it is."""

    name: str
    source: str
    spec: Tensor
    layer: LayerPlan | None
    expert: int | None = None


def student_items(
    plan: Plan, present: set[str] | None = None, layer_tensors: tuple[Tensor, ...] | None = None
) -> list[Item]:
    """Every student tensor in checkpoint order (embedding, layers renumbered from 0, norm, head).

    ``present``: the teacher's tensor names; a tied ``lm_head.weight`` is written only if the teacher wrote
    one (untied heads are always expected). ``layer_tensors``: the layout of the decoder layers (default:
    on disk); per-expert tensors become one item per kept expert, renumbered from 0.
    """
    t = plan.teacher
    layer_tensors = t.layer_tensors() if layer_tensors is None else layer_tensors
    embed, *after = [spec for spec in t.global_tensors() if spec is not LM_HEAD]
    items = [Item(embed.name, embed.name, embed, None)]
    for new, layer in enumerate(plan.layers):
        student, teacher = f"model.layers.{new}.", f"model.layers.{layer.source}."
        for spec in layer_tensors:
            if spec.per_expert:
                for k, e in enumerate(layer.experts):
                    items.append(Item(student + spec.name.format(e=k), teacher + spec.name.format(e=e), spec, layer, k))
            else:
                items.append(Item(student + spec.name, teacher + spec.name, spec, layer))
    items += [Item(spec.name, spec.name, spec, None) for spec in after]
    if not t.tied or (present is not None and LM_HEAD.name in present):
        items.append(Item(LM_HEAD.name, LM_HEAD.name, LM_HEAD, None))
    return items


# --- the student config -----------------------------------------------------------------------------------------


def config_changes(plan: Plan, config: Any) -> dict[str, Any]:
    """The fields of the teacher's ``config`` (a dict or a config object) to rewrite: the shape (``head_dim``
    always explicit) and per-layer lists."""
    changes = config_updates(plan.teacher, plan.student, config)
    layer_types = config.get("layer_types") if isinstance(config, dict) else getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and len(layer_types) == plan.teacher.layers:
        changes["layer_types"] = [layer_types[layer.source] for layer in plan.layers]
    return changes


def _check_teacher(shape: Shape, plan: Plan, where: str) -> None:
    if shape != plan.teacher:
        raise UserError(
            "the plan was made for a model of another shape",
            where=where,
            fix="make the plan from this model's config (and scores computed on it)",
        )


# --- in memory --------------------------------------------------------------------------------------------------


def prune_model(model: Any, plan: Plan) -> Any:
    """A new transformers model of the student's shape holding the plan's slices of ``model``'s weights.

    The student is built from the teacher's config with the shape fields rewritten, without random
    initialisation, and filled with ``load_state_dict(strict=True)``, so any tensor the table misses is an
    error rather than a silently random weight.
    """
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    _check_teacher(Shape.from_config(model.config), plan, where=type(model).__name__)
    memory = plan.teacher.memory_layer_tensors()
    state = model.state_dict()
    expected = {name for name, _ in all_tensors(plan.teacher, memory)}
    if set(state) - expected:
        raise RuntimeError(f"tensors missing from the family table: {sorted(set(state) - expected)[:5]}")
    pruned = {}
    with torch.no_grad():
        for item in student_items(plan, present=set(state), layer_tensors=memory):
            pruned[item.name] = slice_tensor(item.spec, state[item.source].__getitem__, plan, item.layer, item.expert)
    config = copy.deepcopy(model.config)
    for key, value in config_changes(plan, config).items():
        setattr(config, key, value)
    with no_init_weights():
        student = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    student.tie_weights()  # no_init_weights skips the tying that from_config would otherwise do
    student.load_state_dict(pruned, strict=True)
    return student.train(model.training)


# --- reading the teacher ------------------------------------------------------------------------------------


def _read(stored: Stored, item: Item, plan: Plan) -> torch.Tensor:
    """One teacher tensor, cut: the file is mapped only while this tensor is read."""
    from safetensors import safe_open

    with safe_open(stored.file, "pt") as f:
        source = f.get_slice(item.source)
        return slice_tensor(item.spec, source.__getitem__, plan, item.layer, item.expert)


@contextlib.contextmanager
def _bytes_bar(description: str, total: int, show: bool) -> Iterator[Callable[[int], None]]:
    """Yield ``advance(n_bytes)``; the bar is left out where stdout must stay machine-readable (--json)."""
    from minitron.report_console import progress

    if not show:
        yield lambda n: None
        return
    with progress() as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# --- the checkpoint ---------------------------------------------------------------------------------------------


def prune_checkpoint(
    src: str | Path,
    plan: Plan,
    out: str | Path,
    *,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    command: str | None = None,
    scores: Any = None,
    show_progress: bool = True,
) -> Path:
    """Write the pruned checkpoint ``out`` from the teacher checkpoint folder ``src``, streamed.

    ``out`` gets safetensors shards (and an index when more than one), ``config.json`` rewritten, the tokenizer,
    generation config and licence files copied, ``plan.json``, and a ``README.md`` model card; ``scores``
    (computed on the fly by the caller) are saved as ``scores.safetensors`` so that the plan can be redone
    without recalibrating. All of it appears at once, or not at all.
    """
    from minitron import model_card

    src, out = Path(src), check_output_dir(out, overwrite, inputs=[("the teacher", src)])
    config = read_config(src)
    _check_teacher(Shape.from_config(config), plan, where=str(src / "config.json"))
    stored = check_weights(src, plan.teacher)
    layout = stored_layout(plan.teacher, set(stored))
    items = student_items(plan, present=set(stored), layer_tensors=layout)

    entries = [(item.name, stored[item.source].dtype, plan.student.stored_shape(item.spec)) for item in items]
    sizes = [math.prod(shape) * DTYPES[dtype].itemsize for _, dtype, shape in entries]
    scores_bytes = sum(t.numel() * t.element_size() for t in scores.tensors.values()) if scores is not None else 0
    check_output_dir(out, overwrite, size=sum(sizes) + copied_bytes(src) + scores_bytes)
    shards = shard_groups(sizes, max_shard_bytes)
    names = (
        ["model.safetensors"]
        if len(shards) == 1
        else [f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors" for k in range(len(shards))]
    )
    with atomic_dir(out, overwrite) as tmp, _bytes_bar("pruning", sum(sizes), show_progress) as advance:

        def cut(members: list[int]) -> Iterator[torch.Tensor]:
            for i in members:
                yield _read(stored[items[i].source], items[i], plan)
                advance(sizes[i])

        for name, members in zip(names, shards):
            write_safetensors(tmp / name, [entries[i] for i in members], cut(members))
        if len(shards) > 1:
            weight_map = {entries[i][0]: name for name, members in zip(names, shards) for i in members}
            index = {"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
        config.update(config_changes(plan, config))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for pattern in COPIED:
            for path in src.glob(pattern):
                if path.is_file():
                    shutil.copy2(path, tmp / path.name)
        plan.save(tmp / "plan.json")
        if scores is not None:
            scores.save(tmp / "scores.safetensors")
        model_card.write(tmp / "README.md", plan, teacher=str(src), command=command)
    return out


# --- the `minitron prune` verb ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Calibration:
    """Where and how to compute importance scores on the fly (``--calib`` and its settings)."""

    data: str
    samples: int = 1024
    seq_len: int = 2048
    batch_size: int = 1
    seed: int = 0


def student_bytes(stored: dict[str, Stored], student: Shape, src: Path | None = None) -> int:
    """The bytes of ``student``'s checkpoint at the teacher's stored bytes per parameter (``stored``: the
    teacher's tensor index), with the files copied from the teacher's folder ``src`` (tokenizer, licence):
    known before calibration chooses what stays, so free space is checked first."""
    stored_bytes = sum(math.prod(t.shape) * DTYPES[t.dtype].itemsize for t in stored.values())
    stored_params = sum(math.prod(t.shape) for t in stored.values())
    return student.counts()["total"] * stored_bytes // max(1, stored_params) + copied_bytes(src)


def run_inputs(model: str, scores_file: Any, calibration: Calibration | None) -> list[tuple[str, Any]]:
    """What a prune reads, which ``--overwrite`` of its output must not delete."""
    return [("MODEL", model), ("--scores", scores_file), ("--calib", calibration.data if calibration else None)]


def copied_bytes(src: Path | None) -> int:
    """The bytes of the files :data:`COPIED` from ``src`` into the student's folder."""
    if src is None:
        return 0
    return sum(p.stat().st_size for pattern in COPIED for p in Path(src).glob(pattern) if p.is_file())


def local_checkpoint(model: str) -> Path:
    """A local checkpoint folder for ``model``: the folder itself, or a hub snapshot (weights and tokenizer)."""
    from minitron.inputs import is_local

    if is_local(model):
        read_config(model)
        return Path(model)
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError

    try:
        return Path(snapshot_download(model, allow_patterns=["*.json", "*.safetensors", *COPIED]))
    except (OSError, HfHubHTTPError) as e:
        raise UserError(
            f"cannot download the checkpoint ({str(e).splitlines()[0]})",
            where=model,
            fix="check the hub id, HF_TOKEN and network access, or pass a local folder",
        ) from None


def calibrate(src: Path, calibration: Calibration, trust_remote_code: bool = False) -> Any:
    """Importance scores of the teacher in ``src`` on ``calibration.data``: the same pass as ``minitron
    importance`` (whole model on the device when it fits, else streamed layer by layer)."""
    from minitron import importance

    scores, _ = importance.score(
        str(src), calibration.data, samples=calibration.samples, seq_len=calibration.seq_len,
        batch_size=calibration.batch_size, seed=calibration.seed, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    return scores


def run(
    model: str,
    teacher: Shape,
    student: Shape,
    *,
    out: str | Path | None,
    drop_layers: list[int] | None = None,
    scores_file: str | Path | None = None,
    calibration: Calibration | None = None,
    dry_run: bool = False,
    overwrite: bool = False,
    trust_remote_code: bool = False,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Prune ``model`` (teacher shape ``teacher``) to ``student`` and return the summary the CLI prints.

    Cheap checks come first (flags, output folder, checkpoint headers, scores file), then the one
    expensive step that may be needed (calibration), then the streamed prune. ``dry_run`` writes nothing
    and needs no weights; given ``scores_file`` it also reports which layers the scores would drop.
    """
    from minitron.plan import make_plan, summary

    if scores_file is not None and calibration is not None:
        raise UserError("both --scores and --calib given", fix="pass one: saved scores, or data to compute them")
    info = summary(model, teacher, student, drop_layers)
    scores = load_scores(scores_file, teacher, model) if scores_file is not None else None
    if dry_run:
        if scores is not None:
            info["dropped_layers"] = make_plan(teacher, student, scores, drop_layers).dropped_layers
        return info
    if out is None:
        raise UserError("no output folder", where="-o", fix="pass -o OUT, or --dry-run to see the shape only")
    inputs = run_inputs(model, scores_file, calibration)
    check_output_dir(out, overwrite, inputs=inputs)
    src = local_checkpoint(model)
    stored = check_weights(src, teacher)  # a broken checkpoint is refused before an hour of calibration, not after
    check_output_dir(out, overwrite, size=student_bytes(stored, student, src), inputs=inputs)
    if calibration is None:
        # Made now, before any weight is read, so that missing scores are reported at once.
        plan = make_plan(teacher, student, scores, drop_layers)
        note_unscaled(scores, teacher, student.hidden < teacher.hidden, scores_file)
    else:
        scores = calibrate(src, calibration, trust_remote_code)
        plan = make_plan(teacher, student, scores, drop_layers)
    prune_checkpoint(
        src, plan, out, overwrite=overwrite, command=command, show_progress=show_progress,
        scores=scores if calibration is not None else None,
    )  # fmt: skip
    info.update(out=str(out), dropped_layers=plan.dropped_layers)
    return info


def note_unscaled(scores: Any, teacher: Shape, cuts_hidden: bool, where: Any) -> None:
    """Say so, once all checks have passed, when scores from before ``norm_energy`` existed will cut embedding
    channels of an RMSNorm family: the norms that remain are then not rescaled (``plan.norm_scales``)."""
    if scores is None or not cuts_hidden or not teacher.family.rms_norms or "norm_energy" in scores.tensors:
        return
    from minitron.artifacts import note

    note(f"{where} has no norm_energy (scores from an older minitron): the RMSNorms that remain are not rescaled "
         "for the embedding channels cut; recompute the scores with `minitron importance` to have them rescaled")


def load_scores(path: str | Path, teacher: Shape, model: str) -> Any:
    """``--scores`` for ``model``, refused if made for another shape; a note if made on a model of another
    name, which the shape check cannot tell apart (a fine-tune of the same architecture, say)."""
    from minitron.importance import Scores

    scores = Scores.load(path, expect=teacher)
    scored = str(scores.meta.get("model", ""))
    if scored and Path(scored).name != Path(str(model)).name:
        from minitron.artifacts import note

        note(f"{path} was computed on {scored}, not {model}: same shape, so it is used, but it ranks the units of "
             "the weights it was computed on")
    return scores

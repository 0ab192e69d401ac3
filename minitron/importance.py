"""Activation-based importance (Minitron, arXiv 2407.14679 §2.2): forward hooks, no gradients.

What is scored, from which activation (``B`` samples × ``S`` tokens per forward pass):

============== ==================================================================================
heads          per query head, the L2 norm of its slice of the ``o_proj`` input (its attention output)
kv_groups      per KV head, the L2 norm of the slices of all query heads that share it
neurons        per MLP neuron, the input of the down projection (per expert for MoE)
hidden         per embedding channel, the outputs of every RMSNorm, summed over all of them
expert_tokens  per MoE expert, how many tokens the router sent to it
expert_norm    per MoE expert, the L2 norm of its (routing-weighted) output on every token, zero where it
               was not chosen: how often *and* how strongly it acts
blocks         per layer, block importance 1 − cos(layer input, layer output), mean over tokens
layer_loss     per layer (optional), the rise of the LM loss when the layer is skipped
============== ==================================================================================

Each activation becomes a per-token magnitude aggregated over each sequence (``seq_agg``) and then over
samples (``batch_agg``), each one of mean / l2 / var; default batch L2 + sequence mean, Minitron's best.
The hooks and aggregations are in :mod:`minitron.importance_hooks` (with why ModelOpt's hooks are not
used), the passes that drive them in :mod:`minitron.layerwise`; this module holds the scores artifact,
the entry points and the CLI verb's work.

Two ways to run the same computation, giving the same scores (tested):

* whole model: the model's own forward, one pass per batch, hooks accumulate;
* layer by layer (``offload``, or a checkpoint streamed from safetensors): the model's own forward runs
  once per batch with its decoder layers replaced by recorders, which capture the embeddings and the
  arguments each layer receives (rotary cos/sin, masks, including per-layer sliding-window masks), so
  every family's own code builds them; then one layer at a time is put on the device and applied to
  the carried hidden states of a chunk of samples.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from minitron.errors import UserError
from minitron.families import Shape
from minitron.importance_hooks import AGGREGATIONS, NORM_AGGREGATIONS, Recorder
from minitron.layerwise import (
    CheckpointLayers,
    CheckpointReader,
    LossSums,
    ResidentLayers,
    chunk_samples,
    free_memory,
    globals_on,
    sweep_pass,
    whole_pass,
)

FORMAT = "minitron-scores"
FORMAT_VERSION = 1


# --- the artifact ---------------------------------------------------------------------------------------------


@dataclass
class Scores:
    """Importance scores of one model: tensors keyed as in docs/CONTRACTS.md plus a JSON-able ``meta``."""

    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    @property
    def shape(self) -> Shape:
        """The teacher shape the scores were computed on."""
        return Shape(**self.meta["shape"])

    @property
    def digest(self) -> str:
        return _digest(self.tensors)

    def save(self, path: str | Path, *, overwrite: bool = False) -> Path:
        """One ``.safetensors`` file; ``meta`` (with the digest of the tensors) is its JSON header."""
        from safetensors.torch import save_file

        from minitron.artifacts import atomic_file

        meta = {**self.meta, "format": FORMAT, "format_version": FORMAT_VERSION, "digest": self.digest}
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in self.tensors.items()}
        with atomic_file(path, overwrite=overwrite) as tmp:
            save_file(tensors, str(tmp), metadata={"minitron": json.dumps(meta, sort_keys=True)})
        self.meta = meta
        return Path(path)

    @classmethod
    def load(cls, path: str | Path, expect: Shape | None = None) -> "Scores":
        """Read a scores file; refuse a corrupt one, and one computed on a shape other than ``expect``."""
        from safetensors import safe_open

        from minitron.inputs import check_format_version

        path = Path(path)
        if not path.is_file():
            what = "a folder, not a scores file" if path.is_dir() else "no such scores file"
            raise UserError(what, where=str(path), fix="pass the file `minitron importance -o` wrote, or run it first")
        fix = "recompute it with `minitron importance`"
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                header = (f.metadata() or {}).get("minitron")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error type, OSError or ValueError on damage
            raise UserError(f"not a readable scores file, corrupt? ({type(e).__name__})", where=str(path), fix=fix) from None
        try:
            meta = json.loads(header) if header else None
        except json.JSONDecodeError:
            meta = None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise UserError("not a minitron scores file (no minitron header)", where=str(path), fix=fix)
        check_format_version(
            meta.get("format_version"), FORMAT_VERSION, kind="scores", where=str(path),
            fix="recompute them with this minitron's `minitron importance`, or use the minitron that wrote them",
        )  # fmt: skip
        # Before the digest: it is computed over the bytes of each dtype, and the pruner's checks (isfinite,
        # argsort) are not implemented for every dtype a safetensors file can hold (fp8, say).
        for key, tensor in tensors.items():
            allowed = _COUNT_DTYPES if key.startswith(_COUNT_KEYS) else _SCORE_DTYPES
            if tensor.dtype not in allowed:
                names = " / ".join(str(d).removeprefix("torch.") for d in allowed)
                raise UserError(f"scores {key!r} are {str(tensor.dtype).removeprefix('torch.')}, not {names}",
                                where=str(path), fix=fix)  # fmt: skip
        if _digest(tensors) != meta.get("digest"):
            raise UserError("scores file is corrupt (digest mismatch)", where=str(path), fix=fix)
        # The digest covers the tensors only: a header edited by hand, or written by another tool, gets here.
        problem = _header_problem(meta)
        if problem:
            raise UserError(f"malformed scores header: {problem}", where=str(path), fix=fix)
        scores = cls(tensors, meta)
        if expect is not None:
            _check_shape(scores.shape, expect, path)
        return scores


# Scores are float32 as written (float16 / bfloat16 are read too); counts, such as the tokens routed to each
# expert, are int64.
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_COUNT_DTYPES = (torch.int64,)
_COUNT_KEYS = ("expert_tokens.",)


def _header_problem(meta: dict[str, Any]) -> str | None:
    """The first thing wrong with the parts of a scores header that minitron reads (``shape``, ``settings``)."""
    import dataclasses
    import reprlib

    shape = meta.get("shape")
    if not isinstance(shape, dict):
        return "no 'shape'" if shape is None else f"'shape' is a {type(shape).__name__}, not a mapping"
    fields = {f.name: f for f in dataclasses.fields(Shape)}
    unknown = [name for name in shape if name not in fields]
    if unknown:
        return f"unknown key 'shape.{unknown[0]}'"
    for name, f in fields.items():
        kind = getattr(f.type, "__name__", f.type)  # "int", "bool" or "str": families.py's annotations are strings
        if name not in shape:
            if f.default is dataclasses.MISSING:
                return f"no 'shape.{name}'"
        elif type(shape[name]).__name__ != kind:  # exact: True is not an int here
            return f"'shape.{name}' is {reprlib.repr(shape[name])}, not {kind}"
    settings = meta.get("settings", {})  # search lays out its held-out blocks by samples and seq_len
    if not isinstance(settings, dict):
        return f"'settings' is a {type(settings).__name__}, not a mapping"
    for name in ("samples", "seq_len"):
        value = settings.get(name, 1)
        if type(value) is not int or value < 1:
            return f"'settings.{name}' is {reprlib.repr(value)}, not a whole number ≥ 1"
    return None


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().to("cpu").contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _check_shape(found: Shape, expect: Shape, path: Path) -> None:
    if found == expect:
        return
    diffs = [f"{k} {a} ≠ {b}" for k, (a, b) in _pairs(found.to_dict(), expect.to_dict()) if a != b]
    raise UserError(
        f"scores were computed for a different model ({', '.join(diffs)})",
        where=str(path),
        fix="recompute the scores on this model with `minitron importance`",
    )


def _pairs(a: dict, b: dict):
    return ((k, (a.get(k), b.get(k))) for k in sorted(set(a) | set(b)))


# --- entry points ---------------------------------------------------------------------------------------------


def _check_aggregations(batch_agg: str, seq_agg: str, norm_agg: str = "sum") -> None:
    for flag, value, known in (
        ("--batch-agg", batch_agg, AGGREGATIONS), ("--seq-agg", seq_agg, AGGREGATIONS),
        ("--norm-agg", norm_agg, NORM_AGGREGATIONS),
    ):  # fmt: skip
        if value not in known:
            raise UserError(f"unknown aggregation {value!r}", where=flag, fix=f"use one of {', '.join(known)}")


def _settings(blocks, batch_size, aggs: tuple[str, str, str], layer_loss, mode, device) -> dict[str, Any]:
    return {
        "samples": int(blocks.shape[0]),
        "seq_len": int(blocks.shape[1]),
        "batch_size": batch_size,
        **dict(zip(("batch_agg", "seq_agg", "norm_agg"), aggs)),
        "layer_loss": layer_loss,
        "mode": mode,
        "device": str(device),
    }


def _scores(recorder: Recorder, losses: LossSums | None, shape: Shape, settings: dict, meta: dict | None) -> Scores:
    from minitron.artifacts import versions

    tensors = recorder.tensors()
    if losses is not None:
        tensors["layer_loss"] = losses.rise()
    bad = next((k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()), None)
    if bad:  # a NaN weight, or an overflow in half precision: every ranking built on these would be arbitrary
        raise UserError(f"the scores are NaN or infinite ({bad}, and maybe more): the model's activations overflowed "
                        "or its weights hold NaN", where=str((meta or {}).get("model", "the model")),
                        fix="check the checkpoint's weights; in float16, try --dtype float32 or bfloat16")  # fmt: skip
    return Scores(tensors, {**(meta or {}), "settings": settings, "shape": shape.to_dict(), "versions": versions()})


def compute_scores(
    model: nn.Module,
    blocks: torch.Tensor,
    *,
    batch_size: int = 1,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    norm_agg: str = "sum",
    layer_loss: bool = False,
    offload: bool = False,
    device: str | torch.device | None = None,
    chunk: int | None = None,
    show_progress: bool = True,
    meta: dict | None = None,
) -> Scores:
    """Score an in-memory transformers causal LM on calibration ``blocks [samples, seq_len]``.

    ``offload``: keep the model where it is (e.g. CPU) and move one decoder layer at a time to ``device``
    (default: where the model is), carrying ``chunk`` samples' hidden states (default: what fits).
    """
    _check_aggregations(batch_agg, seq_agg, norm_agg)
    shape = Shape.from_config(model.config)
    home = next(model.parameters()).device
    device = torch.device(device) if device is not None else home
    model.eval()
    recorder = Recorder(model, shape, batch_agg, seq_agg, norm_agg)
    losses = LossSums(shape.layers) if layer_loss else None
    try:
        with torch.no_grad(), _progress(blocks.numel(), show_progress) as advance:
            if not offload:
                whole_pass(model, blocks, batch_size, recorder, losses, home, advance)
            else:
                n = chunk or chunk_samples(shape, blocks.shape[1], batch_size, layer_loss, device, model.dtype)
                with globals_on(model, device):
                    source = ResidentLayers(model.model.layers, device)
                    sweep_pass(model, blocks, batch_size, recorder, losses, device, source, n, advance)
    finally:
        recorder.remove()
    mode = "layer-by-layer" if offload else "whole-model"
    settings = _settings(blocks, batch_size, (batch_agg, seq_agg, norm_agg), layer_loss, mode, device)
    return _scores(recorder, losses, shape, settings, meta)


def score_checkpoint(
    folder: str | Path,
    blocks: torch.Tensor,
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    batch_size: int = 1,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    norm_agg: str = "sum",
    layer_loss: bool = False,
    chunk: int | None = None,
    trust_remote_code: bool = False,
    show_progress: bool = True,
    meta: dict | None = None,
) -> Scores:
    """Score a checkpoint folder layer by layer, streaming each layer's weights from its safetensors.

    The model is built on the meta device; only the embeddings, the final norm (and the output head for
    ``layer_loss``) and one decoder layer at a time get real memory, so an 8B teacher is scored on a
    machine that could not hold it.
    """
    from minitron.families import meta_model
    from minitron.inputs import load_config

    _check_aggregations(batch_agg, seq_agg, norm_agg)
    folder = Path(folder)
    config = load_config(folder, trust_remote_code=trust_remote_code)
    shape, device = Shape.from_config(config), torch.device(device)
    model = meta_model(config).to(dtype).eval()
    base = model.model
    reader = CheckpointReader(folder)
    reader.materialize(base.embed_tokens, {"weight": "model.embed_tokens.weight"}, device)
    reader.materialize(base.norm, {k: f"model.norm.{k}" for k in base.norm.state_dict()}, device)  # Nemotron: a bias
    # Rotary frequencies are non-persistent buffers (not in the checkpoint): build the module anew.
    with torch.device(device):
        base.rotary_emb = type(base.rotary_emb)(config=model.config)
    if layer_loss:
        if shape.tied:
            model.get_output_embeddings().weight = base.embed_tokens.weight
        else:
            reader.materialize(model.get_output_embeddings(), {"weight": "lm_head.weight"}, device)
    recorder = Recorder(model, shape, batch_agg, seq_agg, norm_agg)
    losses = LossSums(shape.layers) if layer_loss else None
    n = chunk or chunk_samples(shape, blocks.shape[1], batch_size, layer_loss, device, dtype)
    source = CheckpointLayers(folder, base.layers, shape, device)
    try:
        with torch.no_grad(), _progress(blocks.numel(), show_progress) as advance:
            sweep_pass(model, blocks, batch_size, recorder, losses, device, source, n, advance)
    finally:
        recorder.remove()
    settings = _settings(blocks, batch_size, (batch_agg, seq_agg, norm_agg), layer_loss, "streamed", device)
    return _scores(recorder, losses, shape, settings, meta)


@contextlib.contextmanager
def _progress(total_tokens: int, show: bool) -> Iterator[Any]:
    if not show:
        yield lambda n: None
        return
    from rich.progress import ProgressColumn
    from rich.text import Text

    from minitron.report_console import human, progress

    class TokensPerSecond(ProgressColumn):
        def render(self, task):
            speed = task.finished_speed or task.speed
            return Text(f"{human(speed)} tok/s" if speed else "… tok/s", style="cyan")

    with progress(TokensPerSecond()) as bar:
        task = bar.add_task("importance", total=total_tokens)
        yield lambda n: bar.advance(task, n)


# --- the CLI verb's work ----------------------------------------------------------------------------------------

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}", where="--device", fix="use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("CUDA is not available on this machine", where="--device", fix="use --device cpu or auto")
    return device


def resolve_dtype(name: str, config: Any, device: torch.device) -> torch.dtype:
    if name == "auto":
        # The checkpoint's own half precision on a GPU; float32 on the CPU, where half-precision matmuls
        # are slow or unsupported on many machines.
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        saved = _DTYPES.get(str(saved).removeprefix("torch."), None) if saved is not None else None
        return saved if device.type == "cuda" and saved is not None else torch.float32
    if name not in _DTYPES:
        raise UserError(f"unknown dtype {name!r}", where="--dtype", fix=f"use auto, {', '.join(_DTYPES)}")
    return _DTYPES[name]


def fits(shape: Shape, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether the whole model's weights fit comfortably (with room for activations) on ``device``."""
    weights = shape.counts()["total"] * torch.empty((), dtype=dtype).element_size()
    return weights * 1.3 < free_memory(device)


def score(
    model: str,
    calib: str,
    *,
    samples: int = 1024,
    seq_len: int = 4096,
    batch_size: int = 1,
    seed: int = 0,
    batch_agg: str = "l2",
    seq_agg: str = "mean",
    norm_agg: str = "sum",
    layer_loss: bool = False,
    offload: bool = False,
    device: str = "auto",
    dtype: str = "auto",
    split: str = "train",
    trust_remote_code: bool = False,
    show_progress: bool = True,
) -> tuple[Scores, dict[str, Any]]:
    """Importance scores of ``model`` (folder or hub id) on ``calib`` data, with how they were computed.

    Every check that can fail on the user's input runs before the model is loaded. The whole model is
    loaded onto ``device`` when it fits there, else it is streamed one layer at a time from its safetensors
    (``offload`` forces that)."""
    from minitron.data import token_blocks
    from minitron.inputs import check_seq_len, check_weights, is_local, load_config, load_tokenizer

    _check_aggregations(batch_agg, seq_agg, norm_agg)
    if batch_size < 1:
        raise UserError("must be ≥ 1", where="--batch-size")
    config = load_config(model, trust_remote_code=trust_remote_code)
    shape = Shape.from_config(config)
    check_seq_len(config, seq_len, "--seq-len")
    local = is_local(model)
    if local:
        check_weights(model, shape)
    torch_device = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, config, torch_device)
    tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, vocab=shape.vocab)
    blocks = token_blocks(tokenizer, calib, seq_len=seq_len, samples=samples, seed=seed, split=split)

    meta = {
        "model": str(model),
        "data": {"source": str(calib), "split": split, "samples": samples, "seq_len": seq_len, "seed": seed},
    }
    streamed = offload or not fits(shape, torch_dtype, torch_device)
    options = dict(batch_size=batch_size, batch_agg=batch_agg, seq_agg=seq_agg, norm_agg=norm_agg,
                   layer_loss=layer_loss)  # fmt: skip
    start = time.perf_counter()
    if streamed:
        folder = Path(model) if local else _download(model)
        scores = score_checkpoint(
            folder, blocks, device=torch_device, dtype=torch_dtype, trust_remote_code=trust_remote_code,
            show_progress=show_progress, meta=meta, **options,
        )  # fmt: skip
    else:
        loaded = _load_model(model, torch_dtype, torch_device, trust_remote_code)
        scores = compute_scores(loaded, blocks, show_progress=show_progress, meta=meta, **options)
    seconds = time.perf_counter() - start
    scores.meta["seconds"] = round(seconds, 3)
    info = {
        "mode": scores.meta["settings"]["mode"],
        "device": str(torch_device),
        "dtype": str(torch_dtype).removeprefix("torch."),
        "tokens": int(blocks.numel()),
        "seconds": seconds,
        "digest": scores.digest,
    }
    return scores, info


def run(
    model: str, calib: str, out: str | Path, *, overwrite: bool = False, **options: Any
) -> tuple[Scores, dict[str, Any]]:
    """``minitron importance``: :func:`score`, then the scores file, which appears only when complete. An
    existing ``out`` is refused before any work."""
    from minitron.artifacts import check_output_dir

    check_output_dir(out, overwrite, folder=False, inputs=[("MODEL", model), ("--calib", calib)])
    scores, info = score(model, calib, **options)
    scores.save(out, overwrite=overwrite)
    return scores, {"out": str(out), **info}


def _load_model(model: str, dtype: torch.dtype, device: torch.device, trust_remote_code: bool) -> nn.Module:
    from minitron.inputs import load_model

    # Straight onto the device: a GPU run never holds the whole model in CPU memory too.
    return load_model(model, dtype=dtype, device_map=str(device), trust_remote_code=trust_remote_code)


def _download(repo: str) -> Path:
    """A hub model's files in the local cache, for streaming its safetensors layer by layer."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=["*.json", "*.safetensors"]))
    except Exception as e:  # hub errors come in many types: network, auth, missing repo
        raise UserError(f"cannot download ({type(e).__name__})", where=repo, fix="check the hub id, network, HF_TOKEN") from None


def summary_table(scores: Scores, info: dict[str, Any]):
    """Per layer: block importance, layer-loss rise, and the spread of head and neuron scores."""
    from rich.table import Table

    from minitron.report_console import human

    t = scores.tensors
    title = (
        f"importance → {info['out']}  ({info['mode']}, {info['device']}, {info['dtype']}, "
        f"{human(info['tokens'])} tokens in {info['seconds']:.1f}s, digest {info['digest'][:12]})"
    )
    table = Table(title=title, title_justify="left")
    for name in ("layer", "block importance", "layer-loss rise", "heads min…max", "neurons min…max"):
        table.add_column(name, justify="right")
    for i in range(scores.shape.layers):
        heads, neurons = t[f"heads.{i}"], t[f"neurons.{i}"]
        table.add_row(
            str(i),
            f"{t['blocks'][i]:.4g}",
            f"{t['layer_loss'][i]:+.4g}" if "layer_loss" in t else "–",
            f"{heads.min():.3g} … {heads.max():.3g}",
            f"{neurons.min():.3g} … {neurons.max():.3g}",
        )
    return table

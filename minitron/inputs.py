"""The one way in: every file a user hands minitron is read and checked here, before any work starts.

Text (calibration and training data, evaluation files, recipes, results), ``config.json``, checkpoint
weights and tokenizers each have one reader, used by every verb, and each way they can be broken is one
:class:`~minitron.errors.UserError` naming the file and the fix:

* text that is binary or not UTF-8 (the line and byte offset are named);
* a ``config.json`` that is not a JSON object, has no or an unknown ``model_type``, or a size field that is
  not a positive whole number;
* weights that are truncated, have a damaged header, lack a tensor the family table expects, hold one of the
  wrong shape or one it does not know, or are pickles only (``pytorch_model.bin``: never loaded, by any verb).

Weights are checked from the safetensors headers alone (milliseconds for an 8B checkpoint), so that a
broken checkpoint is refused before an hour of calibration, not after. :func:`load_model` then loads with
transformers and refuses what its loading report shows missing or reshaped, which also covers hub ids:
transformers would otherwise initialise a missing tensor at random and carry on.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minitron.errors import UserError
from minitron.families import FAMILIES, LM_HEAD, Shape, Tensor, config_field, family_of

INDEX_FILE = "model.safetensors.index.json"
WEIGHTS_FILE = "model.safetensors"
TO_UTF8 = "save it as UTF-8 text (e.g. iconv -f latin1 -t utf-8 FILE > NEW)"
TO_SAFETENSORS = (
    "minitron reads safetensors only and never loads pickles; convert it once with transformers: "
    "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(NEW_DIR)"
)

# --- text -------------------------------------------------------------------------------------------------------


def decode(data: bytes, where: str, *, line: int = 1, offset: int = 0) -> str:
    """``data`` as text, refusing binary data and bytes that are not UTF-8 (a leading BOM is dropped).

    ``line`` and ``offset``: where ``data`` starts in its file, for the message."""

    def at(position: int) -> str:
        lines = data.count(b"\n", 0, position)
        return f"line {line + lines}, byte offset {offset + position}"

    nul = data.find(b"\x00")
    if nul >= 0:
        # UTF-8 allows NUL, but no text format minitron reads contains one: it is a binary file.
        raise UserError(f"binary data, not text (NUL byte at {at(nul)})", where=where, fix=TO_UTF8)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"not UTF-8 text (byte 0x{data[e.start]:02x} at {at(e.start)})", where=where, fix=TO_UTF8) from None


def read_text(path: str | Path, *, newlines: bool = True) -> str:
    """A whole text file, checked by :func:`decode`; a missing or unreadable file is a one-line error too.

    ``newlines``: CRLF and CR become LF, as ``Path.read_text`` does; ``False`` keeps them (for ``csv``, which
    must see the line endings inside quoted fields as they are).
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise _unreadable(e, path) from None
    text = decode(data, str(path))
    return text.replace("\r\n", "\n").replace("\r", "\n") if newlines else text


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """``(line number, line)`` of a text file read one line at a time (large JSONL files), checked as
    :func:`decode` checks a whole file."""
    path = Path(path)
    offset = 0
    try:
        with path.open("rb") as f:
            for number, raw in enumerate(f, start=1):
                yield number, decode(raw, f"{path}:{number}", line=number, offset=offset)
                offset += len(raw)
    except OSError as e:
        raise _unreadable(e, path) from None


def _unreadable(error: OSError, path: Path) -> UserError:
    """The one line for a text file that could not be opened or read."""
    if isinstance(error, FileNotFoundError):
        return UserError("no such file", where=str(path), fix="check the path")
    if isinstance(error, IsADirectoryError):
        return UserError("a folder, not a file", where=str(path), fix="pass a file")
    return UserError(f"cannot read ({error.strerror or type(error).__name__})", where=str(path),
                     fix="check that you may read it")  # fmt: skip


def check_format_version(found: Any, known: int, *, kind: str, where: str, fix: str) -> None:
    """Refuse a file of minitron's own (``kind``: scores, results) written in a format version other than the
    one this code reads."""
    import reprlib

    if found != known:
        raise UserError(f"{kind} format_version {reprlib.repr(found)} is not one this minitron reads ({known})",
                        where=where, fix=fix)  # fmt: skip


def read_json(path: str | Path) -> Any:
    """A JSON file (UTF-8), with the line of a syntax error."""
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON ({e.msg}, line {e.lineno})", where=str(path)) from None
    except RecursionError:  # the decoder recurses once per level of nesting
        raise UserError("not usable JSON (nested too deeply to read)", where=str(path)) from None


# --- config.json ------------------------------------------------------------------------------------------------

# Config fields that count something: each must be a whole number ≥ 1 where present. (Shape fields derived
# from them are checked again after Shape.from_config, which catches the required ones that are absent.)
SIZE_FIELDS = (
    "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
    "head_dim", "vocab_size", "max_position_embeddings", "num_local_experts", "num_experts", "num_experts_per_tok",
    "moe_intermediate_size",
)  # fmt: skip
# Sizes beyond any model that exists, by far (the widest: hidden 25,600, MLP 53,248, vocab 262,144; layers ≤ 126,
# experts ≤ 512; contexts of 10M): a value past these is a typo, and the --target grid grows with the width.
SIZE_LIMITS = {"num_hidden_layers": 2**16, "num_attention_heads": 2**16, "num_key_value_heads": 2**16,
               "num_local_experts": 2**16, "num_experts": 2**16, "num_experts_per_tok": 2**16,
               "max_position_embeddings": 2**31}  # fmt: skip
WIDTH_LIMIT = 2**20  # every other size field
# The config field behind each Shape field, for the message when a derived value is missing or wrong.
SHAPE_FIELDS = {
    "hidden": "hidden_size", "ffn": "intermediate_size", "layers": "num_hidden_layers",
    "heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "head_dim": "head_dim",
    "vocab": "vocab_size",
}  # fmt: skip


def check_config(config: Any, where: str) -> Shape:
    """The :class:`Shape` of a config (dict or transformers config), refusing sizes that are not positive
    whole numbers and a head layout that cannot be grouped; ``where`` names the file in messages."""
    family_of(config, where)
    for key in SIZE_FIELDS:
        value = config_field(config, key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{key} is {value!r}, not a whole number", where=where, fix="fix or re-save config.json")
        if value < 1:
            raise UserError(f"{key} is {value}; it must be at least 1", where=where, fix="fix or re-save config.json")
        limit = SIZE_LIMITS.get(key, WIDTH_LIMIT)
        if value > limit:
            raise UserError(f"{key} is {value:,}, more than any model has (at most {limit:,} here)", where=where,
                            fix="fix or re-save config.json")  # fmt: skip
    for key in ("hidden_size", "num_attention_heads"):
        if config_field(config, key) is None:
            raise UserError(f"config.json has no {key}", where=where, fix="re-save the config with save_pretrained")
    shape = Shape.from_config(config)
    for name, key in SHAPE_FIELDS.items():
        value = getattr(shape, name)
        if value is None or value < 1:
            raise UserError(f"config.json has no usable {key} ({value})", where=where,
                            fix="re-save the config with save_pretrained")  # fmt: skip
    if shape.heads % shape.kv_heads:
        raise UserError(
            f"num_attention_heads {shape.heads} is not a multiple of num_key_value_heads {shape.kv_heads}",
            where=where,
            fix="fix or re-save config.json",
        )
    return shape


def read_config(model: str | Path) -> dict[str, Any]:
    """``config.json`` of a local folder as a dict, checked (see :func:`check_config`)."""
    path = Path(model)
    if not path.exists():
        raise UserError("no such file or folder", where=str(path), fix="pass a checkpoint folder or a hub id")
    if not path.is_dir():
        raise UserError("not a folder", where=str(path), fix="pass the folder that holds config.json")
    config_file = path / "config.json"
    if not config_file.is_file():
        what = "config.json is not a regular file" if config_file.exists() else "folder has no config.json"
        raise UserError(what, where=str(config_file if config_file.exists() else path),
                        fix="pass a folder written by save_pretrained")  # fmt: skip
    config = read_json(config_file)
    if not isinstance(config, dict):
        raise UserError(f"config.json holds a JSON {type(config).__name__}, not an object", where=str(config_file),
                        fix="pass the config.json written by save_pretrained")  # fmt: skip
    if "model_type" not in config:
        raise UserError("config.json has no model_type", where=str(config_file),
                        fix=f"name the family, one of: {', '.join(sorted(FAMILIES))}")  # fmt: skip
    bad = _not_finite(config)
    if bad:
        raise UserError(f"{bad[0]} is {bad[1]}, not a finite number", where=str(config_file),
                        fix="fix or re-save config.json")  # fmt: skip
    check_config(config, str(config_file))
    return config


def _not_finite(value: Any, key: str = "") -> tuple[str, float] | None:
    """The first ``(dotted key, value)`` in a parsed JSON value that is NaN or ±Infinity (Python's json reads
    them, and ``rms_norm_eps: NaN`` would make every activation NaN), else None."""
    if isinstance(value, float) and not math.isfinite(value):
        return key, value
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for k, v in items:
        found = _not_finite(v, f"{key}.{k}" if key else str(k))
        if found:
            return found
    return None


def is_local(model: str | Path) -> bool:
    """A path that exists, or one that looks like a path rather than a hub id ``org/name``: it starts like a
    path, has not exactly one slash, or its first part is a folder here (``runs/studnet``, a typo, is refused
    as a missing folder at once instead of being looked up on the hub)."""
    text = str(model)
    return (
        Path(text).exists() or text.startswith((".", "/", "~")) or text.count("/") != 1
        or Path(text.split("/")[0]).is_dir()
    )  # fmt: skip


@contextlib.contextmanager
def hub_quiet() -> Iterator[None]:
    """huggingface_hub (and datasets) log each retry of a request ("Retrying in 8s [Retry 4/5]") to stderr;
    while minitron asks the hub, only its own one-line error may speak for a failure."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def load_config(model: str | Path, trust_remote_code: bool = False) -> Any:
    """A transformers ``PretrainedConfig`` for a local folder or a hub id, checked like :func:`read_config`."""
    from huggingface_hub.errors import StrictDataclassError  # what transformers 5 raises for a field's type
    from transformers import AutoConfig

    if is_local(model):
        read_config(model)  # raises the one-line errors before transformers gets a chance to
    try:
        with hub_quiet():
            config = AutoConfig.from_pretrained(str(model), trust_remote_code=trust_remote_code)
    except OSError as e:
        raise UserError(
            f"cannot load a config ({str(e).splitlines()[0]})",
            where=str(model),
            fix="check the path or hub id, and HF_TOKEN / network access for gated hub models",
        ) from None
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:  # transformers' own validation of the fields
        reason = " ".join(str(e).split()) or type(e).__name__  # the field and its fault may be on two lines
        reason = reason if len(reason) <= 200 else reason[:199] + "…"
        raise UserError(f"transformers cannot read this config ({reason})", where=str(model),
                        fix="fix or re-save config.json with save_pretrained") from None  # fmt: skip
    check_config(config, str(model))
    return config


def check_seq_len(config: Any, seq_len: int, where: str, whose: str = "model") -> None:
    """Refuse blocks longer than the ``whose`` model's context: positions beyond it were never trained (and
    some rotary scalings are undefined there), so the numbers, or the training, would mean nothing."""
    context = config_field(config, "max_position_embeddings")
    if context is not None and seq_len > context:
        raise UserError(f"{seq_len} tokens is more than the {whose}'s context of {context}", where=where,
                        fix=f"use at most {context}")  # fmt: skip


# --- weights ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stored:
    """Where one tensor of a checkpoint is, and what its header says it is."""

    file: Path
    dtype: str
    shape: tuple[int, ...]


def all_tensors(shape: Shape, layer_tensors: tuple[Tensor, ...] | None = None) -> Iterator[tuple[str, Tensor]]:
    """Every (stored name, axes) the family table allows in a checkpoint of ``shape`` in the layout
    ``layer_tensors`` (default: on disk), a tied head included."""
    layer_tensors = shape.layer_tensors() if layer_tensors is None else layer_tensors
    for spec in shape.global_tensors() + ((LM_HEAD,) if shape.tied else ()):
        yield spec.name, spec
    for i in range(shape.layers):
        for spec in layer_tensors:
            for name in shape.stored_names(spec.name):
                yield f"model.layers.{i}.{name}", spec


def stored_layout(shape: Shape, names: set[str]) -> tuple[Tensor, ...]:
    """The layout of a checkpoint's decoder layers: on disk (what the hub holds and ``save_pretrained``
    writes), or in memory (transformers loads that as well), whichever its names are in."""
    memory = shape.memory_layer_tensors()
    differs = [t for t in memory if t.parts]
    if differs and all(f"model.layers.0.{t.name}" in names for t in differs):
        return memory
    return shape.layer_tensors()


def weights_index(folder: str | Path) -> dict[str, Stored]:
    """Name → (file, dtype, shape) of every tensor in a safetensors checkpoint, from the headers only.

    Refuses a folder without safetensors (naming pickles, which are never loaded), a damaged index, a missing
    shard, and a shard whose header is damaged or whose data is cut short.
    """
    from safetensors import SafetensorError, safe_open

    src = Path(folder)
    index_file = src / INDEX_FILE
    weight_map: dict[str, str] | None = None
    if index_file.is_file():
        index = read_json(index_file)
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise UserError("not a safetensors index (no weight_map of names to files)", where=str(index_file),
                            fix="re-download the checkpoint")  # fmt: skip
        files = sorted(set(weight_map.values()))
    elif (src / WEIGHTS_FILE).is_file():
        # As transformers does: without an index the weights are model.safetensors alone. Other safetensors
        # files may sit beside them (a pruned student keeps its scores.safetensors there).
        files = [WEIGHTS_FILE]
    else:
        files = sorted(p.name for p in src.glob("*.safetensors") if p.is_file())
    if not files:
        pickles = sorted(p.name for p in src.glob("*.bin")) + sorted(p.name for p in src.glob("*.pt"))
        if pickles:
            raise UserError(f"only pickled weights ({', '.join(pickles[:2])})", where=str(src), fix=TO_SAFETENSORS)
        raise UserError("no *.safetensors weights (a folder with only config.json gives shapes, not weights)",
                        where=str(src), fix="pass a checkpoint folder with its weights")  # fmt: skip
    found: dict[str, Stored] = {}
    for name in files:
        path = src / name
        if not path.is_file():
            what = "a folder, not a weights file" if path.is_dir() else "shard named in the index is missing"
            raise UserError(what, where=str(path), fix="re-download the checkpoint")
        try:
            # numpy: the headers are read without importing torch.
            with safe_open(str(path), "np") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    found[key] = Stored(path, sl.get_dtype(), tuple(sl.get_shape()))
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"damaged safetensors file ({str(e).splitlines()[0]})", where=str(path),
                            fix="re-download or re-save it") from None  # fmt: skip
    if weight_map is not None:
        for key, name in weight_map.items():
            if key not in found or found[key].file.name != name:
                raise UserError(f"the index puts {key} in {name}, which does not hold it", where=str(index_file),
                                fix="re-download the checkpoint")  # fmt: skip
    return found


def check_weights(folder: str | Path, shape: Shape | None = None) -> dict[str, Stored]:
    """:func:`weights_index`, compared with the tensors the family table expects of ``shape`` (default: the
    folder's config): every one present with its shape, and none the table does not know."""
    src = Path(folder)
    if shape is None:
        shape = Shape.from_config(read_config(src))
    stored = weights_index(src)
    expected = dict(all_tensors(shape, stored_layout(shape, set(stored))))
    unknown = sorted(set(stored) - set(expected))
    if unknown:
        raise UserError(
            f"checkpoint has tensors the {shape.model_type} table does not know: {', '.join(unknown[:3])}",
            where=str(src),
            fix="re-save the model with a current transformers (save_pretrained)",
        )
    for name, spec in expected.items():
        if name not in stored:
            if spec is LM_HEAD and shape.tied:
                continue  # a tied head is the embedding; writing it too is optional
            raise UserError(f"checkpoint lacks {name}", where=str(src),
                            fix="re-download or re-save the checkpoint (minitron never fills in missing weights)")  # fmt: skip
        if stored[name].shape != shape.stored_shape(spec):
            raise UserError(
                f"{name} has shape {stored[name].shape}, config.json says {shape.stored_shape(spec)}",
                where=str(src),
                fix="the weights do not belong to this config.json",
            )
    return stored


def load_model(model: str | Path, *, dtype: Any, trust_remote_code: bool = False, **options: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors only, refusing any tensor that transformers
    reports missing or reshaped (it would otherwise initialise it at random). A local checkpoint is checked by
    :func:`check_weights` first; a hub id is checked by the loading report alone."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if is_local(model):
        check_weights(model)
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the load report is replaced by the one-line error below
    hf_logging.disable_progress_bar()  # its "Loading weights" bar would precede any later error line on stderr
    try:
        with hub_quiet():
            lm, report = AutoModelForCausalLM.from_pretrained(
                str(model), dtype=dtype, trust_remote_code=trust_remote_code, use_safetensors=True,
                output_loading_info=True, **options,
            )  # fmt: skip
    except OSError as e:
        raise UserError(f"cannot load the model weights ({str(e).splitlines()[0]})", where=str(model),
                        fix="pass a checkpoint folder or hub id with safetensors weights") from None  # fmt: skip
    except RuntimeError as e:  # a shape mismatch that only the loader can see (hub ids)
        raise UserError(f"weights do not fit the config ({str(e).splitlines()[0][:200]})", where=str(model),
                        fix="the weights do not belong to this config.json") from None  # fmt: skip
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
    broken = sorted(report.get("missing_keys") or []) + sorted(str(k) for k in report.get("mismatched_keys") or [])
    if broken:
        raise UserError(f"checkpoint lacks or misshapes {broken[0]}" + (f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""),
                        where=str(model), fix="re-download the checkpoint (minitron never fills in missing weights)")  # fmt: skip
    return lm


def load_tokenizer(
    source: str | Path,
    *,
    trust_remote_code: bool = False,
    fix: str = "save the tokenizer files (tokenizer.json, tokenizer_config.json) beside the checkpoint",
    vocab: int | None = None,
) -> Any:
    """The tokenizer of a checkpoint folder or hub id; a missing or unreadable one is a one-line error, and so,
    given the model's ``vocab``, is one with more tokens than that (:func:`check_vocab`)."""
    from transformers import AutoTokenizer

    try:
        with hub_quiet():
            tokenizer = AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, UnicodeDecodeError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"cannot load a tokenizer ({reason[:200]})", where=str(source), fix=fix) from None
    if vocab is not None:
        check_vocab(tokenizer, vocab, where=str(source), fix="pass the tokenizer this model was trained with")
    return tokenizer


def check_vocab(tokenizer: Any, vocab: int, *, where: str, fix: str) -> None:
    """Refuse a tokenizer whose ids run past the model's ``vocab`` embedding rows: the model would fail on the
    first such token, after loading. Its base vocabulary counts: tokens added on top of it (a pad token, say)
    may lie past the embedding unused."""
    if tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer has {tokenizer.vocab_size:,} tokens, the model's vocab_size is {vocab:,}",
                        where=where, fix=fix)  # fmt: skip

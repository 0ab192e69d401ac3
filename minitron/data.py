"""Calibration data: text from local files or the hub → fixed-length token blocks, chosen by a seed.

Minitron scores importance on ~1024 blocks of a few thousand tokens. Documents are shuffled by the seed,
tokenized in batches (one fast-tokenizer call per batch of documents, not per document), joined with EOS
and packed into ``seq_len`` blocks until ``samples`` blocks are full. Only as many documents as needed are
tokenized, so a large corpus costs no more than the tokens actually used.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from minitron.errors import UserError
from minitron.inputs import hub_quiet, read_text, text_lines

SUFFIXES = (".txt", ".jsonl", ".parquet")
# Documents per tokenizer call: large enough to amortise the call, small enough not to over-tokenize.
_TOKENIZE_BATCH = 256


def load_texts(source: str | Path, *, split: str = "train") -> list[str]:
    """The documents of ``source`` as a list of non-empty strings.

    ``source`` is a ``.txt`` file (documents separated by blank lines; one per line when it has no blank
    line), a ``.jsonl`` file (field ``text``, else the first string field of each record), a ``.parquet``
    file (column ``text``), a folder holding such files (read in sorted order), or a ``datasets`` hub name,
    optionally ``name:config`` (e.g. ``wikitext:wikitext-2-raw-v1``), read with ``split``.
    """
    path = Path(source)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in SUFFIXES)
        if not files:
            raise UserError(
                "folder holds no calibration files", where=str(path), fix=f"put {', '.join(SUFFIXES)} files in it"
            )
        texts = [t for f in files for t in _read_file(f, allow_empty=True)]
        if not texts:
            raise UserError("calibration files hold no text", where=str(path), fix="pass a folder with text in it")
        return texts
    if path.is_file():
        return _read_file(path, allow_empty=False)
    if path.exists():
        raise UserError("neither a file nor a folder (a device or a pipe?)", where=str(source),
                        fix="pass a text file or a folder of them")  # fmt: skip
    if looks_local(str(source)):
        raise UserError("no such calibration file or folder", where=str(source), fix="check the path")
    return _read_hub(str(source), split)


def token_blocks(
    tokenizer: Any,
    source: str | Path | list[str],
    *,
    seq_len: int,
    samples: int,
    seed: int,
    split: str = "train",
    what: str = "calibration data",
    flags: str = "--samples / --seq-len",
) -> torch.LongTensor:
    """``samples`` blocks of ``seq_len`` token ids, ``[samples, seq_len]``, the same for the same seed.

    ``source`` is anything :func:`load_texts` reads, or a list of documents already loaded; ``what`` names
    the text in an error (a list has no path to name), ``flags`` what the user can lower when it is too short.
    """
    if seq_len < 2 or samples < 1:
        raise UserError(
            f"need seq_len ≥ 2 and samples ≥ 1 (got {seq_len}, {samples})", where="--seq-len / --samples"
        )
    texts = list(source) if isinstance(source, list) else load_texts(source, split=split)
    where = what if isinstance(source, list) else str(source)
    if not texts:
        raise UserError(f"{what} holds no text", where=where)
    separator = _separator(tokenizer)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed)).tolist()

    needed = samples * seq_len
    stream: list[int] = []
    for start in range(0, len(order), _TOKENIZE_BATCH):
        batch = [texts[i] for i in order[start : start + _TOKENIZE_BATCH]]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            stream.extend(ids)
            stream.extend(separator)
        if len(stream) >= needed:
            break
    if len(stream) < needed:
        raise UserError(
            f"{what} has {len(stream):,} tokens, fewer than samples × seq_len = {needed:,}",
            where=where,
            fix=f"pass more text, or lower {flags}",
        )
    return torch.tensor(stream[:needed], dtype=torch.long).view(samples, seq_len)


# --- readers --------------------------------------------------------------------------------------------------


def _read_file(path: Path, *, allow_empty: bool) -> list[str]:
    if path.suffix == ".txt":
        texts = _split_txt(read_text(path))
    elif path.suffix == ".jsonl":
        texts = _read_jsonl(path)
    elif path.suffix == ".parquet":
        texts = _read_parquet(path)
    else:
        raise UserError(
            f"unsupported calibration file type {path.suffix!r}",
            where=str(path),
            fix=f"use {', '.join(SUFFIXES)}, a folder of them, or a datasets hub name",
        )
    if not texts and not allow_empty:
        raise UserError("calibration file holds no text", where=str(path), fix="pass a file with text in it")
    return texts


def _split_txt(text: str) -> list[str]:
    # Blank lines separate documents (paragraph-style corpora); a file without any is one document a line.
    lines = text.splitlines()
    if any(not line.strip() for line in lines):
        docs, current = [], []
        for line in lines + [""]:
            if line.strip():
                current.append(line)
            elif current:
                docs.append("\n".join(current))
                current = []
        return docs
    return [line for line in lines if line.strip()]


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    for lineno, line in text_lines(path):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"line {lineno} is not valid JSON ({e.msg})", where=str(path)) from None
        text = _text_field(record)
        if text is None:
            raise UserError(f"line {lineno} has no string field", where=str(path), fix='give each record a "text"')
        if text.strip():
            texts.append(text)
    return texts


def _text_field(record: Any) -> str | None:
    if not isinstance(record, dict):
        return record if isinstance(record, str) else None
    if isinstance(record.get("text"), str):
        return record["text"]
    return next((v for v in record.values() if isinstance(v, str)), None)


def _read_parquet(path: Path) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    fix = "re-write it, e.g. pandas' DataFrame.to_parquet, or give the text as .txt / .jsonl"
    try:
        columns = pq.ParquetFile(path).schema_arrow.names  # the footer alone: says whether it is parquet at all
    except (pa.ArrowException, OSError, ValueError) as e:
        raise UserError(f"not a readable parquet file ({str(e).splitlines()[0][:120]})", where=str(path),
                        fix=fix) from None  # fmt: skip
    if "text" not in columns:
        raise UserError(f"no 'text' column (it has: {', '.join(columns[:8]) or 'none'})", where=str(path),
                        fix="name the text column 'text'")  # fmt: skip
    try:
        table = pq.read_table(path, columns=["text"])
    except (pa.ArrowException, OSError, ValueError) as e:  # a footer that is whole over damaged data
        raise UserError(f"damaged parquet file ({str(e).splitlines()[0][:120]})", where=str(path), fix=fix) from None
    return [t for t in table.column("text").to_pylist() if isinstance(t, str) and t.strip()]


def looks_local(source: str) -> bool:
    """Whether a text source that does not exist was meant as a local path. A hub name is "name" or
    "org/name" (with an optional ":config"); anything with a file suffix, more slashes, a path prefix, or a
    first part that is a folder here (``data/wikitxt``, a typo) was meant as a local path."""
    name = source.split(":", 1)[0]
    return (
        name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in SUFFIXES
        or (name.count("/") == 1 and Path(name.split("/")[0]).is_dir())
    )  # fmt: skip


def _read_hub(source: str, split: str) -> list[str]:
    import datasets

    name, _, config = source.partition(":")
    try:
        with hub_quiet():
            dataset = datasets.load_dataset(name, config or None, split=split)
    except Exception as e:  # datasets raises many types (network, missing config, missing split)
        raise UserError(
            f"cannot load hub dataset ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
            where=source,
            fix="check the name (name or name:config), --split, and network / HF_TOKEN",
        ) from None
    column = "text" if "text" in dataset.column_names else None
    if column is None:
        column = next(
            (c for c, f in dataset.features.items() if getattr(f, "dtype", None) in ("string", "large_string")),
            None,
        )
    if column is None:
        raise UserError("hub dataset has no text column", where=source, fix="use a dataset with a 'text' column")
    texts = [t for t in dataset[column] if isinstance(t, str) and t.strip()]
    if not texts:
        raise UserError("hub dataset holds no text", where=f"{source} [{split}]")
    return texts


def _separator(tokenizer: Any) -> list[int]:
    # EOS between documents, as in pre-training; BOS where a tokenizer has no EOS; nothing if it has neither.
    for token_id in (tokenizer.eos_token_id, tokenizer.bos_token_id):
        if token_id is not None:
            return [int(token_id)]
    return []

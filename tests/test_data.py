"""Calibration data: every input format, packing with EOS, seeded choice, and the user errors."""

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tiny import tiny_tokenizer

from minitron.data import load_texts, token_blocks
from minitron.errors import UserError

DOCS = ["the quick brown fox", "jumps over the lazy dog", "a small model learns", "from a big model"]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


def write(path, kind, docs=DOCS):
    if kind == "txt-blank":
        path.write_text("\n\n".join(d.replace(" ", " \n", 1) for d in docs) + "\n")
    elif kind == "txt-lines":
        path.write_text("\n".join(docs) + "\n")
    elif kind == "jsonl":
        path.write_text("".join(json.dumps({"id": i, "text": d}) + "\n" for i, d in enumerate(docs)))
    elif kind == "jsonl-other-field":
        path.write_text("".join(json.dumps({"id": i, "content": d}) + "\n" for i, d in enumerate(docs)))
    elif kind == "parquet":
        pq.write_table(pa.table({"text": docs, "n": list(range(len(docs)))}), path)
    return path


@pytest.mark.parametrize(
    "kind,suffix",
    [("txt-lines", ".txt"), ("jsonl", ".jsonl"), ("jsonl-other-field", ".jsonl"), ("parquet", ".parquet")],
)
def test_load_texts_reads_every_format(tmp_path, kind, suffix):
    assert load_texts(write(tmp_path / f"data{suffix}", kind)) == DOCS


def test_txt_blank_lines_separate_documents(tmp_path):
    texts = load_texts(write(tmp_path / "d.txt", "txt-blank"))
    # Each document was written over two lines; the blank lines, not the newlines, split them.
    assert len(texts) == len(DOCS)
    assert [t.replace(" \n", " ") for t in texts] == DOCS


def test_folder_reads_all_files_in_order(tmp_path):
    write(tmp_path / "b.jsonl", "jsonl", DOCS[2:])
    write(tmp_path / "a.txt", "txt-lines", DOCS[:2])
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "notes.md").write_text("not calibration data")
    assert load_texts(tmp_path) == DOCS


@pytest.mark.parametrize("kind", ["empty-txt", "blank-jsonl", "empty-parquet", "empty-folder", "missing"])
def test_no_text_is_a_user_error_naming_the_file(tmp_path, kind):
    if kind == "empty-txt":
        target = tmp_path / "empty.txt"
        target.write_text("")
    elif kind == "blank-jsonl":
        target = tmp_path / "blank.jsonl"
        target.write_text('{"text": "  "}\n\n')
    elif kind == "empty-parquet":
        target = write(tmp_path / "e.parquet", "parquet", [])
    elif kind == "empty-folder":
        target = tmp_path / "folder"
        target.mkdir()
    else:
        target = tmp_path / "nope.txt"
    with pytest.raises(UserError) as e:
        load_texts(target)
    assert str(target) in e.value.line()


@pytest.mark.parametrize(
    "kind, words",
    [("not parquet", "not a readable parquet file"), ("cut short", "not a readable parquet file"),
     ("no text column", "no 'text' column (it has: content, n)")],
)
def test_a_broken_parquet_file_is_named_for_what_is_wrong(tmp_path, kind, words):
    path = tmp_path / "d.parquet"
    if kind == "not parquet":
        path.write_text("text\nhello\n")
    else:
        pq.write_table(pa.table({"content" if kind == "no text column" else "text": DOCS, "n": range(len(DOCS))}), path)
        if kind == "cut short":
            path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(UserError) as e:
        load_texts(path)
    assert str(path) in e.value.line() and words in e.value.line()


def test_blocks_pack_documents_joined_with_eos(tokenizer, tmp_path):
    docs = [f"the fox {i} jumps over the dog" for i in range(40)]
    blocks = token_blocks(tokenizer, docs, seq_len=16, samples=5, seed=0)
    assert blocks.shape == (5, 16) and blocks.dtype == torch.long
    # Packing is a plain concatenation: the blocks read back as the documents with EOS between them.
    stream = blocks.flatten().tolist()
    eos = tokenizer.eos_token_id
    pieces, current = [], []
    for t in stream:
        if t == eos:
            pieces.append(current)
            current = []
        else:
            current.append(t)
    encoded = {tuple(ids) for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]}
    # The stream starts at a document, so every piece ended by an EOS is one whole document.
    assert len(pieces) >= 3
    assert all(tuple(p) in encoded for p in pieces)


def test_blocks_are_seeded(tokenizer, tmp_path):
    source = write(tmp_path / "d.jsonl", "jsonl", [f"the fox {i} jumps over the dog" for i in range(60)])
    a = token_blocks(tokenizer, source, seq_len=12, samples=6, seed=1)
    b = token_blocks(tokenizer, source, seq_len=12, samples=6, seed=1)
    c = token_blocks(tokenizer, source, seq_len=12, samples=6, seed=2)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_too_little_text_says_how_much(tokenizer, tmp_path):
    source = write(tmp_path / "d.txt", "txt-lines")
    with pytest.raises(UserError) as e:
        token_blocks(tokenizer, source, seq_len=64, samples=100, seed=0)
    assert "fewer than samples × seq_len = 6,400" in e.value.line() and str(source) in e.value.line()


def test_blocks_tokenize_only_what_they_need(tokenizer):
    class Counting:
        eos_token_id, bos_token_id = tokenizer.eos_token_id, tokenizer.bos_token_id
        calls = 0

        def __call__(self, texts, **kw):
            Counting.calls += 1
            return tokenizer(texts, **kw)

    docs = [f"the fox {i} jumps" for i in range(5000)]
    token_blocks(Counting(), docs, seq_len=8, samples=4, seed=0)
    # One batched call covers 256 documents, far more than 32 tokens: the other 4,744 are never tokenized.
    assert Counting.calls == 1


def test_unreachable_hub_dataset_is_a_user_error():
    # Tests run offline (conftest sets HF_HUB_OFFLINE): the hub path must fail as one line, not a traceback.
    with pytest.raises(UserError) as e:
        load_texts("nobody-here/no-such-dataset")
    assert "cannot load hub dataset" in e.value.line() and "nobody-here/no-such-dataset" in e.value.line()

"""The readers of everything a user hands minitron: what they accept, and where their refusals point.

The CLI-level refusals of broken files, one per row, are in tests/test_bad_inputs.py; these tests pin the
readers' own behaviour (line and byte offsets, newlines, BOMs, what is accepted) and the one path the table
cannot reach offline: transformers' loading report for a checkpoint that was not checked beforehand.
"""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny import save_tiny

from minitron import inputs
from minitron.errors import UserError
from minitron.families import Shape


def test_decode_names_line_and_byte_of_the_first_bad_byte():
    with pytest.raises(UserError, match=r"byte 0xe9 at line 3, byte offset 11\)"):
        inputs.decode(b"one\ntwo\nsix\xe9", "f.txt")
    with pytest.raises(UserError, match=r"binary data.*NUL byte at line 2, byte offset 4"):
        inputs.decode(b"one\n\x00", "f.txt")
    assert inputs.decode("\ufeffcafé".encode(), "f.txt") == "café"  # a BOM is not part of the text


def test_read_text_turns_crlf_into_lf_unless_asked_not_to(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\r\nb\rc\n")
    assert inputs.read_text(path) == "a\nb\nc\n" == path.read_text()
    assert inputs.read_text(path, newlines=False) == "a\r\nb\rc\n"


def test_text_lines_numbers_lines_and_points_at_the_bad_one(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_bytes(b"\xef\xbb\xbf{}\n{}\n\xff\n")
    lines = inputs.text_lines(path)
    assert next(lines) == (1, "{}\n") and next(lines) == (2, "{}\n")
    with pytest.raises(UserError, match=r"t.jsonl:3: not UTF-8 text \(byte 0xff at line 3, byte offset 9\)"):
        next(lines)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs") / "llama"
    save_tiny("llama", folder)
    return folder


def test_check_config_accepts_a_saved_config_and_names_a_bad_field(llama):
    config = inputs.read_config(llama)
    assert inputs.check_config(config, "c") == Shape.from_config(config)
    with pytest.raises(UserError, match="c: num_key_value_heads is 0; it must be at least 1"):
        inputs.check_config({**config, "num_key_value_heads": 0}, "c")
    with pytest.raises(UserError, match="c: config.json has no usable vocab_size"):
        inputs.check_config({k: v for k, v in config.items() if k != "vocab_size"}, "c")


def test_check_weights_accepts_a_tied_head_written_or_not(tmp_path):
    written = tmp_path / "granite"
    save_tiny("granite", written)  # tied embeddings
    weights = load_file(written / "model.safetensors")
    shape = Shape.from_config(inputs.read_config(written))
    assert shape.tied
    with_head = {**weights, "lm_head.weight": weights["model.embed_tokens.weight"].clone()}
    save_file(with_head, written / "model.safetensors", metadata={"format": "pt"})
    assert "lm_head.weight" in inputs.check_weights(written)
    save_file({k: v for k, v in with_head.items() if k != "lm_head.weight"}, written / "model.safetensors")
    assert "lm_head.weight" not in inputs.check_weights(written)


def test_check_weights_follows_a_sharded_index(tmp_path, llama):
    folder = tmp_path / "sharded"
    shutil.copytree(llama, folder)
    weights = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k] for k in keys}, folder / file)
    index = {"weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / inputs.INDEX_FILE).write_text(json.dumps(index))
    stored = inputs.check_weights(folder)
    assert {k: s.file.name for k, s in stored.items()} == index["weight_map"]
    index["weight_map"][names[0]] = "model-00002-of-00002.safetensors"  # a map that contradicts the shards
    (folder / inputs.INDEX_FILE).write_text(json.dumps(index))
    with pytest.raises(UserError, match=f"puts {names[0]} in model-00002-of-00002"):
        inputs.check_weights(folder)


def test_weights_are_model_safetensors_not_every_safetensors_file_beside_them(tmp_path, llama):
    # prune --calib keeps the scores it computed as scores.safetensors inside the student's folder; the
    # student must still load through the checked reader (transformers reads model.safetensors alone too).
    folder = tmp_path / "student"
    shutil.copytree(llama, folder)
    save_file({"blocks": torch.ones(2), "heads.0": torch.ones(4)}, folder / "scores.safetensors")
    stored = inputs.check_weights(folder)
    assert {s.file.name for s in stored.values()} == {"model.safetensors"}
    assert "blocks" not in stored


def test_load_model_refuses_what_the_loading_report_shows_missing(tmp_path, llama, monkeypatch):
    # A hub checkpoint is not checked from its headers first: the loading report must catch a missing tensor
    # (transformers would initialise it at random). Simulated with a local folder and the header check off.
    folder = tmp_path / "no-k"
    shutil.copytree(llama, folder)
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.self_attn.k_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    monkeypatch.setattr(inputs, "check_weights", lambda *a, **k: {})
    with pytest.raises(UserError, match="lacks or misshapes model.layers.1.self_attn.k_proj.weight"):
        inputs.load_model(folder, dtype=torch.float32)


def test_load_model_loads_a_sound_checkpoint(llama):
    model = inputs.load_model(llama, dtype=torch.float32)
    reference = load_file(llama / "model.safetensors")
    assert torch.equal(model.state_dict()["model.layers.1.self_attn.k_proj.weight"],
                       reference["model.layers.1.self_attn.k_proj.weight"])  # fmt: skip


def test_check_seq_len_allows_the_full_context_and_no_more():
    inputs.check_seq_len({"max_position_embeddings": 256}, 256, "--seq-len")
    with pytest.raises(UserError, match="--seq-len: 257 tokens is more than the model's context of 256"):
        inputs.check_seq_len({"max_position_embeddings": 256}, 257, "--seq-len")


def test_a_path_whose_first_part_is_a_folder_here_is_local_not_a_hub_id(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert inputs.is_local("runs/studnet") and not inputs.is_local("meta-llama/Llama-3.1-8B")
    with pytest.raises(UserError, match="runs/studnet: no such file or folder"):
        inputs.load_config("runs/studnet")  # at once: not looked up on the hub


def test_hub_retries_are_not_logged_while_minitron_asks_the_hub(caplog):
    import logging

    hub = logging.getLogger("huggingface_hub.utils._http")
    with caplog.at_level(logging.WARNING):
        with inputs.hub_quiet():
            hub.warning("Retrying in 8s [Retry 4/5].")
        hub.warning("after")
    assert [r.getMessage() for r in caplog.records] == ["after"]

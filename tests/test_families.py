import glob
import json
from pathlib import Path

import pytest
from tiny import FAMILY_NAMES, tiny_model

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape, config_updates, family_of, load_config, meta_model, read_config

SHARED_MODELS = sorted(glob.glob(str(Path(__file__).parents[1] / ".." / "shared" / "models" / "*" / "config.json")))


def test_every_tested_family_is_supported():
    assert set(FAMILY_NAMES) == set(FAMILIES)


@pytest.mark.parametrize("config_file", SHARED_MODELS, ids=lambda p: Path(p).parent.name)
def test_counts_equal_transformers_full_size(config_file):
    config = load_config(Path(config_file).parent)
    shape = Shape.from_config(config)
    model = meta_model(config)
    total = sum(p.numel() for p in model.parameters())
    counts = shape.counts()
    assert counts["total"] == total
    embedding = model.get_input_embeddings().weight.numel()
    if not config.tie_word_embeddings:
        embedding += model.get_output_embeddings().weight.numel()
    assert counts["embedding"] == embedding
    assert counts["non_embedding"] == total - embedding
    if shape.experts:
        # Active = everything but the (E - k) unused experts' weights in every layer.
        moe = model.model.layers[0].block_sparse_moe.experts
        per_expert = (moe.gate_up_proj.numel() + moe.down_proj.numel()) // shape.experts
        assert counts["active"] == total - shape.layers * (shape.experts - shape.top_k) * per_expert
        assert counts["active"] < total
    else:
        assert counts["active"] == total


def test_shared_models_are_all_checked():
    # The eight configs the brief names must all be present for the count test to mean something.
    assert len(SHARED_MODELS) == 8


def test_counts_equal_transformers_tiny(family_name):
    model = tiny_model(family_name)
    assert Shape.from_config(model.config).counts()["total"] == sum(p.numel() for p in model.parameters())


def test_tensor_table_matches_checkpoint_names(family_name, tmp_path):
    from safetensors import safe_open

    model = tiny_model(family_name)
    model.save_pretrained(tmp_path)
    shape = Shape.from_config(model.config)
    expected = {t.name: shape.tensor_shape(t) for t in shape.global_tensors()}
    for i in range(shape.layers):
        expected.update({f"model.layers.{i}.{t.name}": shape.tensor_shape(t) for t in shape.layer_tensors()})
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if shape.tied:
        on_disk.pop("lm_head.weight", None)  # some versions write the tied copy; it is the same tensor
    assert on_disk == expected


def test_memory_names_exist(family_name):
    model = tiny_model(family_name)
    family = family_of(model.config)
    names = dict(model.named_parameters())
    for disk_name, memory_name in family.memory_names.items():
        assert f"model.layers.0.{memory_name}" in names, disk_name


def test_config_updates_write_head_dim():
    teacher = Shape.from_config(load_config(Path(SHARED_MODELS[0]).parent))
    student = teacher.replace(hidden=teacher.hidden // 2)
    assert config_updates(teacher, student)["head_dim"] == teacher.head_dim


def test_unsupported_family_is_one_line(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(UserError) as e:
        read_config(tmp_path)
    assert "gpt2" in e.value.line() and "llama" in e.value.line() and "\n" not in e.value.line()


def test_missing_and_configless_paths(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_config(tmp_path / "absent")
    with pytest.raises(UserError, match="no config.json"):
        read_config(tmp_path)

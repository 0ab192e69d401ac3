import glob
import json
from pathlib import Path

import pytest
import torch
from tiny import FAMILY_NAMES, tiny_model

from minitron.errors import UserError
from minitron.families import FAMILIES, Shape, config_updates, meta_model
from minitron.inputs import load_config, read_config

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"
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
        moe = model.model.layers[0].get_submodule(shape.family.moe).experts
        per_expert = (moe.gate_up_proj.numel() + moe.down_proj.numel()) // shape.experts
        assert counts["active"] == total - shape.layers * (shape.experts - shape.top_k) * per_expert
        assert counts["active"] < total
    else:
        assert counts["active"] == total


def test_shared_models_are_all_checked():
    # The fourteen configs the briefs name must all be present for the count test to mean something.
    assert len(SHARED_MODELS) == 14


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
        for t in shape.layer_tensors():
            expected.update({f"model.layers.{i}.{name}": shape.stored_shape(t) for name in shape.stored_names(t.name)})
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        on_disk = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    if shape.tied:
        on_disk.pop("lm_head.weight", None)  # some versions write the tied copy; it is the same tensor
    assert on_disk == expected


def test_memory_table_matches_the_state_dict(family_name):
    model = tiny_model(family_name)
    shape = Shape.from_config(model.config)
    in_memory = {k: tuple(v.shape) for k, v in model.state_dict().items() if k.startswith("model.layers.0.")}
    assert in_memory == {f"model.layers.0.{t.name}": shape.tensor_shape(t) for t in shape.memory_layer_tensors()}


def test_per_expert_tensors_assemble_into_the_fused_ones(tmp_path):
    """Qwen3-MoE on disk: one tensor per expert and projection; in memory gate‖up fused and stacked."""
    from safetensors import safe_open

    from minitron.families import assemble

    model = tiny_model("qwen3_moe")
    model.save_pretrained(tmp_path)
    shape = Shape.from_config(model.config)
    state = model.state_dict()
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        for t in shape.memory_layer_tensors():
            built = assemble(shape, t, lambda name: f.get_tensor(f"model.layers.1.{name}"))
            assert torch.equal(built, state[f"model.layers.1.{t.name}"]), t.name


@pytest.mark.parametrize("field, value", [("mlp_only_layers", [0, 2]), ("decoder_sparse_step", 2)])
def test_qwen3_moe_with_dense_layers_is_refused_in_one_line(tmp_path, field, value):
    config = json.loads((Path(SHARED_MODELS[0]).parents[1] / "qwen3-30b-a3b" / "config.json").read_text())
    config[field] = value
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError) as e:
        read_config(tmp_path)
    line = e.value.line()
    assert field in line and "not supported" in line and str(tmp_path / "config.json") in line and "\n" not in line


def test_qwen3_8b_at_qwen3_4b_width_has_its_non_embedding_parameters():
    """The Qwen3 recipe's student: Qwen3-8B cut to Qwen3-4B's hidden and MLP widths, heads and layers kept.
    Qwen3-4B ties its output head, Qwen3-8B does not, so only the non-embedding counts agree."""
    teacher = Shape.from_config(read_config(SHARED / "qwen3-8b"))
    qwen3_4b = Shape.from_config(read_config(SHARED / "qwen3-4b"))
    student = teacher.replace(hidden=qwen3_4b.hidden, ffn=qwen3_4b.ffn)
    assert (student.heads, student.kv_heads, student.head_dim, student.layers) == (
        qwen3_4b.heads, qwen3_4b.kv_heads, qwen3_4b.head_dim, qwen3_4b.layers
    )
    assert student.counts()["non_embedding"] == qwen3_4b.counts()["non_embedding"] == 3_633_511_936
    assert student.counts()["total"] - qwen3_4b.counts()["total"] == qwen3_4b.vocab * qwen3_4b.hidden


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

"""The model card records the lineage and is only ever appended to."""

import json

import torch
import yaml
from test_evaluate import PRUNED_CARD
from test_plan import random_scores, tiny_shape

from minitron import model_card
from minitron.plan import make_plan, norm_count, student_shape


def pruned_plan():
    teacher = tiny_shape("granitemoe")
    scores = random_scores(teacher)
    scores.meta.update(data="wiki.txt", samples=16)
    return make_plan(teacher, student_shape(teacher, experts=2, drop_layers=[1, 2]), scores, [1, 2]), scores


def test_card_records_teacher_shape_scores_command_and_versions(tmp_path):
    plan, scores = pruned_plan()
    card = tmp_path / "README.md"
    model_card.write(card, plan, teacher="ibm-granite/granite-3.1-1b-a400m-base", command="minitron prune x -o y")
    text = card.read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["base_model"] == "ibm-granite/granite-3.1-1b-a400m-base" and "pruned" in front["tags"]
    assert "`minitron prune x -o y`" in text
    assert "| dropped layers (teacher numbering) | 1-2 |" in text
    assert "| experts | 4 | 2 |" in text and "| layers | 4 | 2 |" in text
    assert f"| params total | {plan.teacher.counts()['total']:,} | {plan.student.counts()['total']:,} |" in text
    assert scores.digest in text and "wiki.txt" in text
    assert "| torch |" in text and "| transformers |" in text


def test_card_names_the_norm_factors_when_the_embedding_was_cut(tmp_path):
    plan, _ = pruned_plan()
    model_card.write(tmp_path / "README.md", plan, teacher="t", command=None)
    assert "norm_scale" not in (tmp_path / "README.md").read_text()  # hidden whole: nothing rescaled
    teacher = tiny_shape("llama")
    energy = torch.rand(norm_count(teacher), teacher.hidden, generator=torch.Generator().manual_seed(0)) + 0.1
    plan = make_plan(teacher, student_shape(teacher, hidden=32), random_scores(teacher, norm_energy=energy))
    model_card.write(tmp_path / "README.md", plan, teacher="t", command=None)
    text = (tmp_path / "README.md").read_text()
    low, high = min(plan.norm_scale), max(plan.norm_scale)
    assert "The weights of the 9 RMSNorms over the embedding channels" in text and f"({low:.3f}–{high:.3f})" in text


def test_local_teacher_is_not_claimed_as_a_hub_model(tmp_path):
    plan, _ = pruned_plan()
    model_card.write(tmp_path / "README.md", plan, teacher=str(tmp_path / "teacher"), command=None)
    text = (tmp_path / "README.md").read_text()
    assert "base_model" not in text and "# Pruned from teacher" in text and "(called from Python)" in text


def test_distillation_section_is_appended(tmp_path):
    plan, _ = pruned_plan()
    card = tmp_path / "README.md"
    model_card.write(card, plan, teacher="org/model", command="minitron prune org/model -o y")
    before = card.read_text()
    model_card.add_distillation_section(card, {"recipe": "recipes/tiny.yaml", "tokens": 1024, "loss": {"kl": 0.5},
                                               "note": "a|b"})  # fmt: skip
    model_card.add_distillation_section(card, {"tokens": 2048})
    text = card.read_text()
    assert text.startswith(before.rstrip("\n"))  # nothing earlier is rewritten
    assert text.count("## Distillation") == 2
    assert "| tokens | 1024 |" in text and '| loss | {"kl": 0.5} |' in text and "| note | a\\|b |" in text
    assert text.index("| tokens | 1024 |") < text.index("| tokens | 2048 |")


def test_distillation_section_starts_a_missing_card(tmp_path):
    card = tmp_path / "student" / "README.md"
    card.parent.mkdir()
    model_card.add_distillation_section(card, {"teacher": "org/model"})
    assert card.read_text().startswith("# student\n") and "| teacher | org/model |" in card.read_text()


def test_lineage_read_back_from_card_and_plan(tmp_path):
    (tmp_path / "README.md").write_text("---\nbase_model: org/teacher\n---\n\n# x\n")
    assert model_card.read_lineage(tmp_path) == {"base_model": "org/teacher", "teacher": "org/teacher", "card": "README.md"}
    (tmp_path / "README.md").write_text(PRUNED_CARD)
    shape = {"model_type": "llama", "hidden": 64, "ffn": 96, "layers": 4, "heads": 4, "kv_heads": 2, "head_dim": 16,
             "vocab": 128, "tied": False}  # fmt: skip
    (tmp_path / "plan.json").write_text(json.dumps({"teacher": shape, "dropped_layers": [2, 3]}))
    facts = model_card.read_lineage(tmp_path)
    assert facts["pruned_from"] == "/models/tiny-teacher" and facts["distilled_from"] == "/models/tiny-teacher-corrected"
    assert facts["dropped_layers"] == [2, 3] and facts["teacher_params"] > 0

"""The CLI contract: user errors are one line on stderr, exit code 2, no traceback."""

import json
from pathlib import Path

import pytest
from clirun import assert_user_error, minitron

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"


run = minitron


def test_inspect_json_granite_moe():
    result = run("inspect", SHARED / "granite-3.1-1b-a400m-base", "--json")
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["family"] == "granitemoe"
    assert info["shape"]["experts"] == 32 and info["shape"]["top_k"] == 8
    assert info["params"]["total"] == 1_334_625_280
    assert info["params"]["active"] == 428_655_616


def test_inspect_table_names_the_counts():
    result = run("inspect", SHARED / "llama-3.1-minitron-4b-width")
    assert result.returncode == 0, result.stderr
    assert "4,512,746,496" in result.stdout


@pytest.mark.parametrize("case", ["missing", "no-config", "unsupported"])
def test_inspect_bad_input(tmp_path, case):
    if case == "missing":
        assert_user_error(run("inspect", tmp_path / "nope"), "no such file")
    elif case == "no-config":
        assert_user_error(run("inspect", tmp_path), "config.json")
    else:
        (tmp_path / "config.json").write_text('{"model_type": "bert"}')
        assert_user_error(run("inspect", tmp_path), "bert", "llama")

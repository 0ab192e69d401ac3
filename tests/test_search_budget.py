"""The parameter budget: reading --target / --active-target / --tolerance, and the default tolerance."""

import json
from pathlib import Path

import pytest

from minitron.errors import UserError
from minitron.families import Shape
from minitron.search_budget import Budget, parse_count, parse_tolerance, target_tolerance

SHARED = Path(__file__).parents[1] / ".." / "shared" / "models"


def full_shape(name: str) -> Shape:
    return Shape.from_config(json.loads((SHARED / name / "config.json").read_text()))


@pytest.mark.parametrize(
    "text, expected",
    [("4B", 4_000_000_000), ("4.5B", 4_500_000_000), ("800M", 800_000_000), ("1.2e9", 1_200_000_000),
     ("0.5x", 500_000_000), ("250k", 250_000), ("4.5b", 4_500_000_000)],
)
def test_parse_count(text, expected):
    assert parse_count(text, 1_000_000_000 if text.endswith("x") else 10**10) == expected


@pytest.mark.parametrize("text, needle", [("1x", "between 0 and 1"), ("1.5x", "between 0 and 1"),
                                          ("9B", "not smaller"), ("8.04B", "not smaller"), ("four", "cannot read"),
                                          ("0", "positive"), ("1e400", "not smaller")])
def test_parse_count_refuses(text, needle):
    with pytest.raises(UserError, match=needle):
        parse_count(text, 8_030_261_248)


def test_parse_tolerance():
    assert parse_tolerance("2%") == pytest.approx(0.02) and parse_tolerance("0.05") == pytest.approx(0.05)
    for bad in ("0", "60%", "x"):
        with pytest.raises(UserError, match="--tolerance"):
            parse_tolerance(bad)


@pytest.mark.parametrize(
    "text, tolerance, why",
    [
        ("8B", 0.5 / 8, "the precision of 8B"),  # anything that rounds to 8B: 7.5B..8.5B
        ("4.5B", 0.02, "the default; 4.5B is precise to ±1.11%"),  # ±0.05B is 1.1 %: the 2 % floor
        ("800M", 50 / 800, "the precision of 800M"),  # trailing zeros of a whole number are not significant
        ("0.800B", 0.02, "is precise to ±0.06%"),  # ... digits after a point are
        ("1.2e9", 0.05 / 1.2, "the precision of 1.2e9"),
        ("12e8", 0.5 / 12, "the precision of 12e8"),  # the same number, the same precision
        ("8.0B", 0.02, "8.0B is precise to ±0.6"),
        ("4B", 0.10, "the precision of 4B, ±12.5%, capped"),
        ("10e8", 0.10, "±50%, capped"),
        (".5B", 0.10, "the precision of .5B"),
        ("8030261248", 0.02, "precise to ±0%"),
        ("0.5x", 0.02, "the default for a fraction like 0.5x"),  # a fraction is a precise request
    ],
)
def test_default_tolerance_is_the_precision_of_the_target(text, tolerance, why):
    got, reason = target_tolerance(text)
    assert got == pytest.approx(tolerance) and why in reason


def test_budget_states_its_tolerance_and_why_and_an_explicit_one_wins():
    llama, moe = full_shape("llama-3.1-8b"), full_shape("granite-3.1-3b-a800m-base")
    default = Budget.parse(llama, "4B")
    assert (default.total, default.tolerance) == (4_000_000_000, 0.10)
    assert default.to_dict()["tolerance_why"] == "the precision of 4B, ±12.5%, capped"
    assert default.describe() == "4.00B params ±10% (the precision of 4B, ±12.5%, capped)"
    explicit = Budget.parse(llama, "4B", tolerance="2%")
    assert (explicit.tolerance, explicit.why) == (0.02, "--tolerance 2%")
    assert Budget.parse(llama, "0.5x").tolerance == 0.02
    # Two targets: the tighter precision holds for both (2.5B is ±2 %, 600M ±8.3 %).
    both = Budget.parse(moe, "2.5B", "600M")
    assert (both.tolerance, both.why) == (0.02, "the precision of 2.5B")
    assert Budget.parse(moe, None, "600M").tolerance == pytest.approx(50 / 600)

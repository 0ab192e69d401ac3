"""The parameter budget of ``minitron prune --target``: what ``--target``, ``--active-target`` and ``--tolerance``
ask for, as :class:`Budget` (counts and one relative tolerance). Text parsing only, no weights.

Default tolerance. Without ``--tolerance`` a target means what it says to the precision it is written in:
``--target 8B`` asks for anything that rounds to 8B, i.e. ±0.5B (6.25 %), so the published Minitron-8B
(8.27B, 3.4 % above) is a candidate, while ``4.5B`` (±0.05B = 1.1 %) is held to the 2 % floor. The rule: half
a unit of the last significant digit, relative to the value. Trailing zeros of a whole number are not
significant (``800M`` is ±50M, ``10e8`` ±0.5e9); digits after a decimal point are (``8.0B`` is ±0.05B,
``0.800B`` ±0.5M), so a precise request is one decimal point away. The result is kept within [2 %, 10 %]:
below 2 % the grid (hidden in 128s, ffn in 256s) leaves too few shapes, and above 10 % (``4B`` would be
±12.5 %) shapes a quarter apart would compete. A fraction (``0.5x``) is exact by nature: 2 %. With both
``--target`` and ``--active-target`` the tighter of the two applies to both. ``--tolerance`` always wins.
Every record states the tolerance and why (``tolerance_why``), e.g. "±6.25% (the precision of 8B)".
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from minitron.errors import UserError
from minitron.families import Shape
from minitron.report_console import budget_text, human, percent

DEFAULT_TOLERANCE = 0.02  # the floor, and the tolerance of a fraction
_MAX_TOLERANCE = 0.10


# --- parsing the targets ---------------------------------------------------------------------------------------

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}
_COUNT = re.compile(r"^\s*(\d+(?:\.\d*)?(?:e\d+)?|\.\d+)\s*([kmbgt]?)\s*$", re.IGNORECASE)
_FRACTION = re.compile(r"^\s*(\d*\.?\d+)\s*x\s*$", re.IGNORECASE)


def parse_count(text: str, teacher_count: int, flag: str = "--target") -> int:
    """``4B``, ``4.5B``, ``800M``, ``1.2e9`` → a parameter count; ``0.5x`` → that fraction of the teacher's.

    Refuses a fraction ≥ 1 and a count ≥ the teacher's: those are not prunes.
    """
    text = str(text)
    fraction = _FRACTION.match(text)
    if fraction:
        value = float(fraction.group(1))
        if not 0 < value < 1:
            raise UserError(
                f"a fraction of the teacher must be between 0 and 1, got {text!r}",
                where=flag,
                fix="pass e.g. 0.5x for half the teacher's parameters",
            )
        return round(value * teacher_count)
    match = _COUNT.match(text)
    if not match:
        raise UserError(
            f"cannot read {text!r} as a parameter count", where=flag, fix="pass e.g. 4B, 4.5B, 800M, 1.2e9 or 0.5x"
        )
    value = float(match.group(1)) * _UNITS[match.group(2).lower()]
    count = round(value) if math.isfinite(value) else None  # 1e400 reads as infinity
    if count is not None and count <= 0:
        raise UserError(f"a parameter count must be positive, got {text!r}", where=flag)
    if count is None or count >= teacher_count:
        raise UserError(
            f"{text}{'' if count is None else f' ({count:,})'} is not smaller than the teacher's {teacher_count:,}",
            where=flag,
            fix=f"pass a count below {human(teacher_count)}, or a fraction like 0.5x",
        )
    return count


def target_tolerance(text: str) -> tuple[float, str]:
    """The tolerance ``TEXT`` asks for when ``--tolerance`` is not given, and why (the rule: module docstring).

    ``8B`` → (0.0625, "the precision of 8B"); ``4.5B`` → 2 %; ``4B`` → 10 % (capped); ``0.5x`` → 2 %.
    """
    text = str(text).strip()
    match = _COUNT.match(text)
    if not match:
        return DEFAULT_TOLERANCE, f"the default for a fraction like {text}"
    mantissa = match.group(1).lower().split("e")[0]
    whole, point, decimals = mantissa.partition(".")
    # The unit of the last significant digit, in the mantissa's own scale (unit suffix and exponent cancel).
    unit = 10.0 ** -len(decimals) if point else 10.0 ** (len(whole) - len(whole.rstrip("0")))
    precision = unit / 2 / float(mantissa)
    if precision < DEFAULT_TOLERANCE:
        return DEFAULT_TOLERANCE, f"the default; {text} is precise to ±{percent(precision)}"
    if precision > _MAX_TOLERANCE:
        return _MAX_TOLERANCE, f"the precision of {text}, ±{percent(precision)}, capped"
    return precision, f"the precision of {text}"


def parse_tolerance(text: str | float) -> float:
    """``2%`` or ``0.02`` → 0.02."""
    raw = str(text).strip()
    try:
        value = float(raw[:-1]) / 100 if raw.endswith("%") else float(raw)
    except ValueError:
        raise UserError(
            f"cannot read {raw!r} as a tolerance", where="--tolerance", fix="pass e.g. 2% or 0.02"
        ) from None
    if not 0 < value < 0.5:
        raise UserError(f"tolerance must lie between 0 and 50%, got {raw!r}", where="--tolerance", fix="pass e.g. 2%")
    return value


# --- the budget ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What the student must weigh: total and/or active parameters per token, each within ``tolerance``
    (``--tolerance``, else the tighter of the targets' :func:`target_tolerance`), with the reason ``why``."""

    total: int | None
    active: int | None
    tolerance: float = DEFAULT_TOLERANCE
    why: str = "the default"

    @classmethod
    def parse(
        cls, teacher: Shape, target: str | None, active_target: str | None = None, tolerance: str | float | None = None
    ) -> "Budget":
        if target is None and active_target is None:
            raise UserError("no parameter budget", where="--target", fix="pass --target 4B (or 0.5x)")
        counts = teacher.counts()
        if active_target is not None and not teacher.experts:
            raise UserError(
                f"{teacher.model_type} is dense: every parameter is active",
                where="--active-target",
                fix="use --target for dense models",
            )
        return cls(
            None if target is None else parse_count(target, counts["total"], "--target"),
            None if active_target is None else parse_count(active_target, counts["active"], "--active-target"),
            *((parse_tolerance(tolerance), f"--tolerance {tolerance}") if tolerance is not None
              else min(target_tolerance(t) for t in (target, active_target) if t is not None)),
        )

    def deviation(self, total: int, active: int) -> float:
        """The largest relative distance from a target; within budget iff ≤ ``tolerance``."""
        off = [abs(total - self.total) / self.total] if self.total else []
        off += [abs(active - self.active) / self.active] if self.active else []
        return max(off)

    def describe(self) -> str:
        return budget_text(self.to_dict())

    def to_dict(self) -> dict[str, Any]:
        return {"total": self.total, "active": self.active, "tolerance": self.tolerance, "tolerance_why": self.why}

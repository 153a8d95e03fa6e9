"""Type and range checks of a settings dataclass (Training.config.TrainConfig, Training.learning.loss.LossConfig).

Each field is checked against its type hint and, where it has one, its rule; the first bad setting is a
SettingsError that names it and its value. A field that holds another settings dataclass is checked by that
class itself (TrainConfig.loss: LossConfig.check).
"""
from __future__ import annotations

import dataclasses
import math
import typing
from typing import Any, Callable, Dict, List, Tuple

from ProbSAMLib.errors import SettingsError, shown

Rule = Tuple[Callable[[Any], bool], str]  # (is the value allowed, what is allowed, for the message)


def at_least(low) -> Rule:
    return (lambda v: v >= low), f"at least {low}"


def positive() -> Rule:
    return (lambda v: v > 0), "greater than 0"


def in_range(low, high) -> Rule:
    """low <= value < high."""
    return (lambda v: low <= v < high), f"in [{low}, {high})"


def one_of(choices) -> Rule:
    return (lambda v: v in choices), f"one of {', '.join(choices)}"


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "text"}


def _type_ok(value, kind) -> bool:
    if kind is bool:
        return isinstance(value, bool)
    if kind is int:  # at most int64: torch tensors, float() and the schedules take it
        return isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2 ** 63
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        try:
            return math.isfinite(float(value))
        except OverflowError:  # an integer beyond float's range
            return False
    return isinstance(value, kind)


def check_fields(settings, rules: Dict[str, Rule]) -> None:
    """SettingsError for the first field of ``settings`` of the wrong type or against its rule in ``rules``."""
    hints = typing.get_type_hints(type(settings))
    for item in dataclasses.fields(settings):
        value, kind = getattr(settings, item.name), hints[item.name]
        optional = type(None) in typing.get_args(kind)
        if optional and value is None:
            continue
        base = next(a for a in typing.get_args(kind) if a is not type(None)) if optional else kind
        if typing.get_origin(base) in (list, List):
            ok = isinstance(value, list) and all(_type_ok(v, int) for v in value)
            expected = "a list of whole numbers"
        elif dataclasses.is_dataclass(base):
            ok, expected = isinstance(value, base), f"a mapping of {base.__name__} settings"
        else:
            ok, expected = _type_ok(value, base), _TYPE_NAMES.get(base, base.__name__)
        if not ok:
            bound = " below 2**63" if base is int and isinstance(value, int) and not isinstance(value, bool) else ""
            raise SettingsError(f"setting {item.name} must be {expected}{bound}, got {shown(value)}")
        rule = rules.get(item.name)
        if rule is not None and not rule[0](value):
            raise SettingsError(f"setting {item.name} must be {rule[1]}, got {shown(value)}")

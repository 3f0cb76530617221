"""Checks of settings' types and ranges, shared by the training loop, the backbones and the methods.

A :class:`Rule` says what a setting must be: its kind (``int``, ``number``, ``bool``, ``str``, ``ints``,
``regex``) and optionally a range or a set of choices. :func:`check_settings` merges a factory's
settings over its defaults and checks every one against its rule, or, for a setting without a rule,
against the kind of its default value. Errors are :class:`ValueError` naming the setting as the config
spells it (``replay.buffer_size``, ``train.lr``, ``backbone.nf``) and the value given::

    replay.buffer_size must be an integer, got 2.5
    train.lr must be > 0, got -1.0
    wsn.bn must be one of refresh, batch, running, got 'nope'
"""
from __future__ import annotations

import math
import numbers
import re
from typing import Any, Callable, NamedTuple, Optional


class Rule(NamedTuple):
    """What a setting must be.

    Attributes:
      kind: ``"int"`` (an integer, not a bool), ``"number"`` (a finite real number, not a bool),
        ``"bool"``, ``"str"``, ``"ints"`` (a list of integers), ``"regex"`` (a string that compiles as a
        regular expression) or ``"any"``.
      test: optional ``value -> bool`` on a value of the right kind (for ``ints``: on each entry).
      says: what ``test`` demands, as the error message words it (``">= 1"``, ``"in (0, 1)"``).
    """

    kind: str
    test: Optional[Callable[[Any], bool]] = None
    says: str = ""


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


_KIND_SAYS = {"int": "an integer", "number": "a finite number", "bool": "true or false", "str": "a string",
              "ints": "a list of integers", "regex": "a regular expression"}


def _kind_ok(kind: str, v) -> bool:
    if kind == "int":
        return _is_int(v)
    if kind == "number":
        return _is_number(v) and math.isfinite(float(v))
    if kind == "bool":
        return isinstance(v, bool) or type(v).__name__ == "bool_"  # numpy's bool too
    if kind in ("str", "regex"):
        return isinstance(v, str)
    if kind == "ints":
        return isinstance(v, (list, tuple)) and all(_is_int(x) for x in v)
    return True


def int_at_least(lo: int) -> Rule:
    """An integer ``>= lo``."""
    return Rule("int", lambda v: v >= lo, f">= {lo}")


def at_least(lo: float) -> Rule:
    """A finite number ``>= lo``."""
    return Rule("number", lambda v: v >= lo, f">= {lo:g}")


def above(lo: float) -> Rule:
    """A finite number ``> lo``."""
    return Rule("number", lambda v: v > lo, f"> {lo:g}")


def between(lo: float, hi: float, closed: str = "()") -> Rule:
    """A finite number in the interval from ``lo`` to ``hi``; ``closed`` gives its brackets, e.g. ``"(]"``."""
    left = (lambda v: v >= lo) if closed[0] == "[" else (lambda v: v > lo)
    right = (lambda v: v <= hi) if closed[1] == "]" else (lambda v: v < hi)
    return Rule("number", lambda v: left(v) and right(v), f"in {closed[0]}{lo:g}, {hi:g}{closed[1]}")


def one_of(*choices) -> Rule:
    """One of ``choices`` (strings)."""
    return Rule("str", lambda v: v in choices, f"one of {', '.join(map(str, choices))}")


#: common rules
POSITIVE_INT = int_at_least(1)
NON_NEGATIVE_INT = int_at_least(0)
POSITIVE = above(0)
NON_NEGATIVE = at_least(0)
FRACTION = between(0, 1, "()")
#: a list of layer widths, each >= 1 (may be empty)
WIDTHS = Rule("ints", lambda v: v >= 1, ">= 1")
REGEX = Rule("regex")


def _rule_of_default(default) -> Rule:
    if isinstance(default, bool):
        return Rule("bool")
    if _is_int(default):
        return Rule("int")
    if _is_number(default):
        return Rule("number")
    if isinstance(default, str):
        return Rule("str")
    if isinstance(default, (list, tuple)):
        return Rule("ints")
    return Rule("any")


def check_value(name: str, value, rule: Rule) -> None:
    """Checks one setting; raises ValueError naming ``name`` and the value."""
    if not _kind_ok(rule.kind, value):
        raise ValueError(f"{name} must be {_KIND_SAYS.get(rule.kind, rule.kind)}, got {value!r}")
    if rule.kind == "regex" and value:
        try:
            re.compile(value)
        except re.error as e:
            raise ValueError(f"{name} must be a regular expression, got {value!r} ({e})") from None
    if rule.test is None:
        return
    if rule.kind == "ints":
        bad = [x for x in value if not rule.test(x)]
        if bad:
            raise ValueError(f"{name} must be {_KIND_SAYS['ints']} {rule.says}, got {list(value)!r}")
    elif not rule.test(value):
        raise ValueError(f"{name} must be {rule.says}, got {value!r}")


def check_settings(prefix: str, defaults: dict, settings: dict, rules: Optional[dict] = None) -> dict:
    """``{**defaults, **settings}`` after checking every setting's type and range.

    Args:
      prefix: the settings' section as errors name it (``"replay"`` gives ``replay.buffer_size``).
      defaults: every setting's default; a setting not in it is refused, naming the valid ones.
      settings: the given settings.
      rules: ``{name: Rule}``; a setting without a rule must have the kind of its default (an integer
        for an integer default, a finite number for a float default, true/false for a bool, a string
        for a string, a list of integers for a list).

    Raises:
      ValueError: naming the first bad setting as ``prefix.name`` and its value.
    """
    rules = rules or {}
    unknown = sorted(set(settings) - set(defaults))
    if unknown:
        raise ValueError(f"{prefix} has no setting {unknown[0]!r}; valid: {', '.join(defaults) or '(none)'}")
    merged = {**defaults, **settings}
    for k, v in merged.items():
        check_value(f"{prefix}.{k}", v, rules.get(k) or _rule_of_default(defaults[k]))
    return merged

"""Config fields that carry their meaning and their limits.

``setting()`` declares a dataclass field with a one-line description (what
``train.config_reference`` prints) and the values it may take; ``check_settings()``
refuses a value outside them in one line naming the dotted key. Every config section
is declared this way, the ``augment`` section (``pipelines.augment.recipe``) included,
which is why this lives in the data layer.

An upper bound either belongs to the meaning (a probability is at most 1) or protects
memory or time (``why`` says which resource, and the message gives it).
"""
from __future__ import annotations

import math
from dataclasses import MISSING, Field, dataclass, field
from typing import Any, Callable

DOC, LIMITS = "doc", "limits"  # the metadata keys setting() writes


@dataclass(frozen=True)
class Limits:
    """The values a setting may take: numbers within ``low``/``high`` (None: unbounded; each
    closed unless open), every number finite; a pair in order (``ordered``); or a string of
    ``choices``. Without reasons, a setting bounded on both sides is an interval of meaning
    (``in [0, 1)``); ``why`` gives the reason of an upper bound that protects memory or time."""

    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    ordered: bool = False
    choices: tuple[str, ...] = ()
    why: str = ""  # why the upper bound (memory, time, a numerical limit)
    low_why: str = ""  # why the lower bound, where it is not plain

    def describe(self) -> str:
        """The rule in a few symbols: ``in [0, 1]``, ``>= 1, <= 65536``, ``one of a, b``."""
        if self.choices:
            return "one of " + ", ".join(self.choices)
        parts = []
        if self._is_interval():
            parts.append(f"in {self._interval()}")
        else:
            if self.low is not None:
                parts.append(self._low_rule())
            if self.high is not None:
                parts.append(self._high_rule())
        if self.ordered:
            parts.append("low <= high")
        return ", ".join(parts) or "finite"

    def _is_interval(self) -> bool:
        return self.low is not None and self.high is not None and not (self.why or self.low_why)

    def _low_rule(self) -> str:
        return f"{'>' if self.low_open else '>='} {_number(self.low)}"

    def _high_rule(self) -> str:
        return f"{'<' if self.high_open else '<='} {_number(self.high)}"

    def _interval(self) -> str:
        return (f"{'(' if self.low_open else '['}{_number(self.low)}, "
                f"{_number(self.high)}{')' if self.high_open else ']'}")

    def problem(self, value: Any, nullable: bool = False) -> str | None:
        """What is wrong with ``value`` (``must be ...``), or None when it is allowed."""
        if self.choices:
            if value in self.choices:
                return None
            if len(self.choices) == 2:
                return f"must be {self.choices[0]!r} or {self.choices[1]!r}"
            return f"must be one of {self.choices}"
        values = value if isinstance(value, tuple) else (value,)
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                return "must be a finite number" + (" in every entry" if len(values) > 1 else "")
            wrong = self._below(v, nullable) or self._above(v)
            if wrong:
                return wrong + (" in every entry" if len(values) > 1 else "")
        if self.ordered and values[0] > values[-1]:
            return "must be in order (low <= high)"
        return None

    def _below(self, v: float, nullable: bool) -> str | None:
        if self.low is None or (v > self.low if self.low_open else v >= self.low):
            return None
        if self._is_interval():
            return f"must be in {self._interval()}"
        return f"must be {self._low_rule()}{' or null' if nullable else ''}{_reason(self.low_why)}"

    def _above(self, v: float) -> str | None:
        if self.high is None or (v < self.high if self.high_open else v <= self.high):
            return None
        if self._is_interval():
            return f"must be in {self._interval()}"
        return f"must be {self._high_rule()}{_reason(self.why)}"


def _reason(why: str) -> str:
    return f" ({why})" if why else ""


def _number(x: float) -> str:
    """``2**32`` for large powers of two, ``0.0113`` or ``8`` otherwise."""
    if float(x).is_integer() and abs(x) < 1e15:
        n = int(x)
        return f"2**{n.bit_length() - 1}" if n >= 2 ** 20 and n & (n - 1) == 0 else str(n)
    return repr(x)


def setting(default: Any = MISSING, doc: str = "", *, factory: Callable[[], Any] | None = None,
            **limits: Any) -> Any:
    """A dataclass field with its description and its ``Limits`` (keyword arguments of ``Limits``)."""
    metadata = {DOC: doc, LIMITS: Limits(**limits)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def field_doc(f: Field) -> str:
    return f.metadata.get(DOC, "")


def field_limits(f: Field) -> Limits:
    return f.metadata.get(LIMITS, Limits())


def check_settings(fields: tuple[Field, ...], values: Any, prefix: str) -> None:
    """ValueError naming ``prefix + name`` for the first value of ``values`` (an object with the
    fields' names as attributes) outside its field's limits; None values are left to the types."""
    for f in fields:
        value = getattr(values, f.name)
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float, str, tuple)):
            continue
        if isinstance(value, tuple) and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in value):
            continue
        wrong = field_limits(f).problem(value, nullable="None" in str(f.type))
        if wrong:
            shown = list(value) if isinstance(value, tuple) else value
            raise ValueError(f"{prefix}{f.name} {wrong}, got {shown!r}")

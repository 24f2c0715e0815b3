"""Conditions of a playbook: parsed once at load time, evaluated per decision (pure).

The YAML form is a list whose items must all hold; each item is a mapping of fields to
either a value (equality) or operators, or one of ``any`` / ``all`` / ``not``::

    conditions:
      - segment: enterprise                 # equality
      - tier: {in: [at_risk, critical]}
      - features.tenure_days: {lt: 90}
      - any:
          - arr_tier: {in: [large, strategic]}
          - segment: enterprise
      - not: {plan: starter}

A field whose value is unknown for the account (no score yet, no traits) matches
nothing, except ``{exists: false}``: a playbook never fires on a guess.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from churnguard.playbooks.catalogue import FieldType

Path = tuple[str | int, ...]

OPERATORS_BY_KIND: Final[Mapping[str, frozenset[str]]] = {
    "number": frozenset({"eq", "ne", "lt", "lte", "gt", "gte", "in", "not_in", "exists"}),
    "string": frozenset({"eq", "ne", "in", "not_in", "exists"}),
    "enum": frozenset({"eq", "ne", "in", "not_in", "exists"}),
    "bool": frozenset({"eq", "exists"}),
    "list": frozenset({"contains", "not_contains", "empty", "exists"}),
}
COMBINATORS: Final = frozenset({"any", "all", "not"})
_SYMBOL: Final = {
    "eq": "==",
    "ne": "!=",
    "lt": "<",
    "lte": "<=",
    "gt": ">",
    "gte": ">=",
    "in": "in",
    "not_in": "not in",
    "contains": "contains",
    "not_contains": "does not contain",
    "empty": "empty is",
    "exists": "exists is",
}


class ConditionError(ValueError):
    """A condition that cannot be used; ``path`` is where in the playbook it is."""

    def __init__(self, path: Path, message: str) -> None:
        super().__init__(message)
        self.path = path
        self.message = message


Facts = Mapping[str, Any]
"""Field name → value for one account at one moment (None or absent: unknown)."""


class Condition:
    """A parsed condition; ``holds(facts)`` decides, ``fields`` names what it reads."""

    def holds(self, facts: Facts) -> bool:
        raise NotImplementedError

    def fields(self) -> set[str]:
        raise NotImplementedError

    def explain_failure(self, facts: Facts) -> str:
        """Why it does not hold, for the decision log (call only when it does not)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Test(Condition):
    field: str
    op: str
    value: Any

    def holds(self, facts: Facts) -> bool:
        actual = facts.get(self.field)
        if self.op == "exists":
            return (actual is not None) is self.value
        if actual is None:
            return False
        match self.op:
            case "eq":
                return bool(actual == self.value)
            case "ne":
                return bool(actual != self.value)
            case "lt":
                return bool(actual < self.value)
            case "lte":
                return bool(actual <= self.value)
            case "gt":
                return bool(actual > self.value)
            case "gte":
                return bool(actual >= self.value)
            case "in":
                return actual in self.value
            case "not_in":
                return actual not in self.value
            case "contains":
                return self.value in actual
            case "not_contains":
                return self.value not in actual
            case "empty":
                return (len(actual) == 0) is self.value
        raise AssertionError(self.op)  # parse() admits no other operator

    def fields(self) -> set[str]:
        return {self.field}

    def describe(self) -> str:
        value = list(self.value) if isinstance(self.value, tuple) else self.value
        return f"{self.field} {_SYMBOL[self.op]} {_show(value)}"

    def explain_failure(self, facts: Facts) -> str:
        actual = facts.get(self.field)
        shown = "unknown" if actual is None else _show(actual)
        return f"{self.describe()} (was {shown})"


@dataclass(frozen=True)
class AllOf(Condition):
    items: tuple[Condition, ...]

    def holds(self, facts: Facts) -> bool:
        return all(c.holds(facts) for c in self.items)

    def fields(self) -> set[str]:
        return set().union(*(c.fields() for c in self.items)) if self.items else set()

    def explain_failure(self, facts: Facts) -> str:
        for c in self.items:
            if not c.holds(facts):
                return c.explain_failure(facts)
        return "all held"

    def describe(self) -> str:
        return " and ".join(c.describe() for c in self.items) or "always"


@dataclass(frozen=True)
class AnyOf(Condition):
    items: tuple[Condition, ...]

    def holds(self, facts: Facts) -> bool:
        return any(c.holds(facts) for c in self.items)

    def fields(self) -> set[str]:
        return set().union(*(c.fields() for c in self.items)) if self.items else set()

    def explain_failure(self, facts: Facts) -> str:
        return "none of: " + "; ".join(c.explain_failure(facts) for c in self.items)

    def describe(self) -> str:
        return "any of (" + "; ".join(c.describe() for c in self.items) + ")"


@dataclass(frozen=True)
class Not(Condition):
    item: Condition

    def holds(self, facts: Facts) -> bool:
        return not self.item.holds(facts)

    def fields(self) -> set[str]:
        return self.item.fields()

    def explain_failure(self, facts: Facts) -> str:
        return f"not ({self.item.describe()}), but it held"

    def describe(self) -> str:
        return f"not ({self.item.describe()})"


ALWAYS: Final = AllOf(())


def _show(value: Any) -> str:
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def parse(raw: Any, known: Mapping[str, FieldType], path: Path = ("conditions",)) -> Condition:
    """Parse a ``conditions`` list (or one item) against the known fields and their types."""
    if raw is None:
        return ALWAYS
    if isinstance(raw, list):
        return AllOf(tuple(_parse_item(item, known, (*path, i)) for i, item in enumerate(raw)))
    return _parse_item(raw, known, path)


def _parse_item(raw: Any, known: Mapping[str, FieldType], path: Path) -> Condition:
    if not isinstance(raw, Mapping) or not raw:
        raise ConditionError(
            path, "a condition is a mapping such as {tier: critical} or {any: [...]}"
        )
    parts: list[Condition] = []
    for key, value in raw.items():
        where = (*path, key)
        if key in COMBINATORS:
            parts.append(_combinator(str(key), value, known, where))
        else:
            parts.append(_field_test(str(key), value, known, where))
    return parts[0] if len(parts) == 1 else AllOf(tuple(parts))


def _combinator(key: str, value: Any, known: Mapping[str, FieldType], path: Path) -> Condition:
    if key == "not":
        if isinstance(value, list):
            return Not(parse(value, known, path))
        return Not(_parse_item(value, known, path))
    if not isinstance(value, list) or not value:
        raise ConditionError(path, f"{key} takes a non-empty list of conditions")
    items = tuple(_parse_item(item, known, (*path, i)) for i, item in enumerate(value))
    return AnyOf(items) if key == "any" else AllOf(items)


def _field_test(field: str, raw: Any, known: Mapping[str, FieldType], path: Path) -> Condition:
    kind = known.get(field)
    if kind is None:
        raise ConditionError(path, f"unknown field {field!r}{_suggest(field, known)}")
    if not isinstance(raw, Mapping):
        op = "contains" if kind.kind == "list" else "eq"
        return Test(field, op, _operand(field, kind, op, raw, path))
    if not raw:
        raise ConditionError(path, "an empty operator mapping")
    tests: list[Condition] = []
    allowed = OPERATORS_BY_KIND[kind.kind]
    for op, operand in raw.items():
        if op not in allowed:
            raise ConditionError(
                (*path, op),
                f"operator {op!r} does not apply to {field} ({kind.describe()}); "
                f"use one of {', '.join(sorted(allowed))}",
            )
        tests.append(Test(field, str(op), _operand(field, kind, str(op), operand, (*path, op))))
    return tests[0] if len(tests) == 1 else AllOf(tuple(tests))


def _operand(field: str, kind: FieldType, op: str, value: Any, path: Path) -> Any:
    if op in ("exists", "empty"):
        if not isinstance(value, bool):
            raise ConditionError(path, f"{op} takes true or false, not {_show(value)}")
        return value
    if op in ("in", "not_in"):
        if not isinstance(value, list) or not value:
            raise ConditionError(path, f"{op} takes a non-empty list")
        return tuple(_scalar(field, kind, v, (*path, i)) for i, v in enumerate(value))
    if op in ("contains", "not_contains"):
        if not isinstance(value, str):
            raise ConditionError(path, f"{op} takes a string, not {_show(value)}")
        return value
    return _scalar(field, kind, value, path)


def _scalar(field: str, kind: FieldType, value: Any, path: Path) -> Any:
    if kind.kind == "number":
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConditionError(path, f"{field} is a number; {_show(value)} is not")
        return float(value)
    if kind.kind == "bool":
        if not isinstance(value, bool):
            raise ConditionError(path, f"{field} is true or false; {_show(value)} is not")
        return value
    if kind.kind == "list":
        raise ConditionError(path, f"{field} is a list; use contains, not_contains or empty")
    if not isinstance(value, str):
        raise ConditionError(path, f"{field} is a string; {_show(value)} is not")
    if kind.kind == "enum" and value not in kind.values:
        raise ConditionError(path, f"{field}: {value!r} is not {kind.describe()}")
    return value


def _suggest(name: str, known: Mapping[str, Any]) -> str:
    import difflib

    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.75)
    return f" (did you mean {close[0]!r}?)" if close else ""


def referenced(conditions: Sequence[Condition]) -> set[str]:
    out: set[str] = set()
    for c in conditions:
        out |= c.fields()
    return out

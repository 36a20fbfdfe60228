"""docs/config.md documents every config key, only those, with the code's defaults and values.

The doc is read as markdown tables: a row whose first cell is a dotted key in backticks
(`` `distill.augment_shift` ``) documents that key, and its cells are key, type / allowed values,
default, meaning. The keys are the leaves of the dataclass tree under :class:`ExperimentConfig`
(nested dataclasses give dotted paths such as ``models.generator.width``). Checked:

* every leaf has exactly one row, and every row names a leaf (a renamed or removed key fails);
* the default cell is the dataclass default written as YAML would (``null``, ``true``, numbers,
  plain strings); tuple defaults are not compared;
* the keys a method fills in (its ``defaults``) default to ``null`` and say "method default";
  the per-method table (a header of method names in backticks) holds every method's values;
* the type cell lists exactly the allowed values of a ``Literal`` field and of the registries
  behind ``data.dataset``, ``models.teacher``, ``models.generator.arch`` and ``method.name``,
  says ``null`` where null is allowed and "``.inf`` accepted" where +inf is.

The checks return their problems as text, so the last test can feed them a damaged doc and see
each one fail.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Callable, Literal

import pytest

from fed_dfkd.config import _INFINITY_ALLOWED, ExperimentConfig
from fed_dfkd.data import dataset_names
from fed_dfkd.models import CLASSIFIERS, GENERATORS
from fed_dfkd.synthesis import SYNTHESIZERS, method_defaults

DOC = Path(__file__).resolve().parents[2] / "docs" / "config.md"

KEY_CELL = re.compile(r"`([a-z_][a-z0-9_]*(?:\.[a-z_][a-z0-9_]*)+)`")
# Cells are split on pipes that are not escaped (a cell may hold `\|x\|`).
CELL_SEPARATOR = re.compile(r"(?<!\\)\|")
COLUMNS = ("key", "type", "default", "meaning")
TYPE, DEFAULT, MEANING = 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Leaf:
    path: str
    annotation: Any
    default: Any  # dataclasses.MISSING when the field has none


def config_leaves(cls: type = ExperimentConfig, prefix: str = "") -> list[Leaf]:
    """Every non-dataclass field under ``cls``, by dotted path, in declaration order."""
    hints = typing.get_type_hints(cls)
    leaves: list[Leaf] = []
    for f in dataclasses.fields(cls):
        path, annotation = f"{prefix}{f.name}", hints[f.name]
        if dataclasses.is_dataclass(annotation):
            leaves.extend(config_leaves(annotation, f"{path}."))
            continue
        default = f.default
        if default is dataclasses.MISSING and f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        leaves.append(Leaf(path, annotation, default))
    return leaves


LEAVES = {leaf.path: leaf for leaf in config_leaves()}
#: The keys some method fills in when the config leaves them null.
METHOD_DEFAULTED = {f"method.{name}" for m in SYNTHESIZERS.names() for name in method_defaults(m)}
REGISTRY_NAMES: dict[str, Callable[[], list[str]]] = {
    "data.dataset": dataset_names,
    "models.teacher": CLASSIFIERS.names,
    "models.generator.arch": GENERATORS.names,
    "method.name": SYNTHESIZERS.names,
}


# --------------------------------------------------------------------------------------------
# Reading the doc
# --------------------------------------------------------------------------------------------


def split_row(line: str) -> list[str] | None:
    """The stripped cells of a table line ``| a | b |``, or None for any other line."""
    line = line.strip()
    if not (line.startswith("|") and line.endswith("|")):
        return None
    return [cell.strip() for cell in CELL_SEPARATOR.split(line)[1:-1]]


def tables(text: str) -> list[list[list[str]]]:
    """Every table as its rows of cells (header and separator row included)."""
    found: list[list[list[str]]] = []
    current: list[list[str]] = []
    for line in text.splitlines():
        cells = split_row(line)
        if cells is None:
            if current:
                found.append(current)
            current = []
        else:
            current.append(cells)
    if current:
        found.append(current)
    return found


def key_rows(text: str) -> tuple[dict[str, list[str]], list[str]]:
    """Rows whose first cell is a dotted key in backticks, by key; and the problems seen."""
    rows: dict[str, list[str]] = {}
    problems: list[str] = []
    for table in tables(text):
        for cells in table:
            match = KEY_CELL.fullmatch(cells[0])
            if match is None:
                continue
            key = match.group(1)
            if key in rows:
                problems.append(f"{key}: documented twice")
            if len(cells) != len(COLUMNS):
                problems.append(f"{key}: row has {len(cells)} cells, expected {len(COLUMNS)} "
                                f"({', '.join(COLUMNS)}); escape a pipe inside a cell as \\|")
            rows[key] = cells
    return rows, problems


def backticked(cell: str) -> set[str]:
    return set(re.findall(r"`([^`]+)`", cell))


# --------------------------------------------------------------------------------------------
# Checks (each returns its problems; empty means in sync)
# --------------------------------------------------------------------------------------------


def check_keys(text: str) -> list[str]:
    rows, problems = key_rows(text)
    problems += [f"{key}: in fed_dfkd/config.py but not documented" for key in LEAVES if key not in rows]
    problems += [f"{key}: documented but not a config key" for key in rows if key not in LEAVES]
    return problems


def yaml_default_matches(text: str, default: Any) -> bool:
    """Whether ``text`` (a default cell without its backticks) is ``default`` as YAML writes it."""
    if default is None:
        return text == "null"
    if isinstance(default, bool):
        return text == ("true" if default else "false")
    if isinstance(default, int):
        return re.fullmatch(r"-?\d+", text) is not None and int(text) == default
    if isinstance(default, float):
        if not re.fullmatch(r"-?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|-?\.inf", text):
            return False
        value = math.inf if text.endswith(".inf") else float(text)
        value = -value if text == "-.inf" else value
        return math.isclose(value, default, rel_tol=1e-12, abs_tol=0.0)
    if isinstance(default, str):
        return text == default
    raise TypeError(f"no YAML rendering for {default!r}")


def check_defaults(text: str) -> list[str]:
    rows, problems = key_rows(text)
    for key, cells in rows.items():
        leaf = LEAVES.get(key)
        if leaf is None or len(cells) != len(COLUMNS):
            continue  # reported by check_keys
        cell = cells[DEFAULT]
        match = re.fullmatch(r"`([^`]*)`", cell)
        if match is None:
            problems.append(f"{key}: default cell {cell!r} is not one value in backticks")
            continue
        if key in METHOD_DEFAULTED:
            if leaf.default is not None:
                problems.append(f"{key}: filled per method, so its dataclass default must be None")
            if "method default" not in cells[MEANING].lower():
                problems.append(f"{key}: the meaning must say 'method default'")
        if isinstance(leaf.default, (tuple, list)):
            continue  # lists are written as YAML flow lists; not compared
        if not yaml_default_matches(match.group(1), leaf.default):
            problems.append(f"{key}: documented default {match.group(1)!r}, "
                            f"fed_dfkd/config.py has {leaf.default!r}")
    return problems


def literal_values(annotation: Any) -> set[str] | None:
    """The allowed values of a ``Literal`` (possibly ``Literal[...] | None``), else None."""
    if typing.get_origin(annotation) is Literal:
        return {str(v) for v in typing.get_args(annotation)}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        for arg in typing.get_args(annotation):
            values = literal_values(arg)
            if values is not None:
                return values
    return None


def allows_none(annotation: Any) -> bool:
    return (typing.get_origin(annotation) in (typing.Union, types.UnionType)
            and type(None) in typing.get_args(annotation))


def check_allowed_values(text: str) -> list[str]:
    rows, problems = key_rows(text)
    for key, cells in rows.items():
        leaf = LEAVES.get(key)
        if leaf is None or len(cells) != len(COLUMNS):
            continue
        cell = cells[TYPE]
        expected = literal_values(leaf.annotation)
        if key in REGISTRY_NAMES:
            expected = set(REGISTRY_NAMES[key]())
        if expected is not None:
            listed = backticked(cell) - {"null", ".inf"}
            if listed != expected:
                problems.append(f"{key}: type cell lists {sorted(listed)}, the code allows "
                                f"{sorted(expected)}")
        if allows_none(leaf.annotation) != ("`null`" in cell):
            problems.append(f"{key}: type cell must say `null` exactly when null is allowed")
        if (key in _INFINITY_ALLOWED) != ("`.inf` accepted" in cell):
            problems.append(f"{key}: type cell must say '`.inf` accepted' exactly when +inf is")
    return problems


def method_table(text: str) -> tuple[list[str], dict[str, list[str]]] | None:
    """(method names, {key: cells}) of the per-method defaults table, or None if absent."""
    methods = set(SYNTHESIZERS.names())
    for table in tables(text):
        names = [cell.strip("`") for cell in table[0][1:]]
        if names and set(names) <= methods:
            return names, {row[0].strip("`"): row[1:] for row in table[2:]}
    return None


def check_method_defaults(text: str) -> list[str]:
    found = method_table(text)
    if found is None:
        return ["no per-method defaults table (a header row of method names in backticks)"]
    names, rows = found
    problems = []
    if sorted(names) != sorted(SYNTHESIZERS.names()):
        problems.append(f"per-method table covers {sorted(names)}, registered: "
                        f"{sorted(SYNTHESIZERS.names())}")
    declared = {name for m in SYNTHESIZERS.names() for name in method_defaults(m)}
    if set(rows) != declared:
        problems.append(f"per-method table rows {sorted(rows)}, the methods declare {sorted(declared)}")
    for key, cells in rows.items():
        for method, cell in zip(names, cells):
            defaults = method_defaults(method) if method in SYNTHESIZERS.names() else {}
            if key not in defaults:
                continue
            match = re.fullmatch(r"`([^`]*)`", cell)
            if match is None or not yaml_default_matches(match.group(1), defaults[key]):
                problems.append(f"per-method table: {method} {key} is {cell!r}, "
                                f"the method declares {defaults[key]!r}")
    return problems


CHECKS = (check_keys, check_defaults, check_allowed_values, check_method_defaults)


# --------------------------------------------------------------------------------------------
# Tests
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def doc_text() -> str:
    return DOC.read_text()


@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_doc_is_in_sync_with_the_config(doc_text: str, check: Callable[[str], list[str]]) -> None:
    problems = check(doc_text)
    assert not problems, "docs/config.md is out of sync:\n" + "\n".join(problems)


def test_the_tree_walk_sees_nested_sections() -> None:
    # The walk itself: nested dataclasses become dotted paths, sections are not leaves.
    assert "models.generator.width" in LEAVES and "models.pretrain.lr" in LEAVES
    assert "models.generator" not in LEAVES and "privacy" not in LEAVES
    assert LEAVES["distill.augment_shift"].default == 0
    assert len(LEAVES) > 100


def _edit_row(text: str, key: str, edit: Callable[[list[str]], list[str] | None]) -> str:
    """``text`` with the row of ``key`` replaced by ``edit(cells)`` (None deletes it)."""
    out, hits = [], 0
    for line in text.splitlines():
        cells = split_row(line)
        if cells and cells[0] == f"`{key}`":
            hits += 1
            cells = edit(cells)
            if cells is None:
                continue
            line = "| " + " | ".join(cells) + " |"
        out.append(line)
    assert hits == 1, f"{key}: {hits} rows"
    return "\n".join(out) + "\n"


def _first(predicate: Callable[[Leaf], bool]) -> str:
    return next(leaf.path for leaf in LEAVES.values() if predicate(leaf))


def _damaged_docs(text: str) -> list[tuple[str, Callable[[str], list[str]], str]]:
    """(damaged doc, the check that must notice, a phrase its report must contain)."""
    last = list(LEAVES)[-1]
    last_line = next(line for line in text.splitlines() if line.startswith(f"| `{last}` "))
    float_key = _first(lambda leaf: type(leaf.default) is float)
    literal_key = _first(lambda leaf: literal_values(leaf.annotation) is not None)
    dropped_value = sorted(literal_values(LEAVES[literal_key].annotation))[0]
    found = method_table(text)
    assert found is not None
    method_key = next(iter(found[1]))
    method_line = next(line for line in text.splitlines()
                       if (split_row(line) or [""])[0] == f"`{method_key}`")
    method_cells = split_row(method_line)
    return [
        (_edit_row(text, last, lambda cells: None), check_keys, "not documented"),
        (text + f"\n| `{last}_renamed` | x | `0` | x |\n", check_keys, "not a config key"),
        (text + f"\n{last_line}\n", check_keys, "documented twice"),
        (_edit_row(text, float_key, lambda cells: [
            *cells[:DEFAULT], f"`{LEAVES[float_key].default + 1.0}`", cells[MEANING]]),
         check_defaults, "documented default"),
        (_edit_row(text, float_key, lambda cells: [*cells[:MEANING], "x | y"]),
         check_keys, "escape a pipe"),
        (_edit_row(text, literal_key, lambda cells: [
            cells[0], cells[TYPE].replace(f"`{dropped_value}`", ""), *cells[DEFAULT:]]),
         check_allowed_values, "the code allows"),
        (text.replace(method_line, "| " + " | ".join([method_cells[0], "`123.0`", *method_cells[2:]]) + " |"),
         check_method_defaults, "the method declares"),
    ]


def test_each_check_notices_a_damaged_doc(doc_text: str) -> None:
    for damaged, check, phrase in _damaged_docs(doc_text):
        assert damaged != doc_text, phrase
        problems = check(damaged)
        assert any(phrase in problem for problem in problems), (check.__name__, phrase, problems)

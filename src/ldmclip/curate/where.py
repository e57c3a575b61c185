"""The ``--where`` expressions of ``ldmclip filter``: a small, safe language over score columns.

An expression is parsed with Python's ``ast`` (``mode="eval"``) and only these constructs are accepted:

* comparisons ``<  <=  >  >=  ==  !=``, also chained (``0.2 <= clip_score < 0.9``), and
  ``in [..]`` / ``not in [..]`` with a list of constants;
* ``and``, ``or``, ``not`` and parentheses;
* numbers (``-1.5``), strings (``"abc"``), ``True`` / ``False``;
* column names: a number column compared with a number, a string column with a string, and a boolean
  column (``dup_keep``) on its own or compared with ``True``/``False``.

Anything else (function calls, attributes, subscripts, arithmetic, lambdas, ...) is refused, and so is a
mistyped column or bad syntax: :func:`parse_where` raises a one-line ``UserError`` that names the columns
there are, before any work is done. Nothing is ever executed: evaluation walks the checked tree and
applies numpy operations to whole columns at once.

For the report of ``ldmclip filter``, an expression also says why a row was dropped: the clauses of its
top-level ``and`` that the row fails, as the user wrote them (``"clip_score >= 0.28"``), and which
thresholds each number column is compared with (the lines of the histograms).
"""

from __future__ import annotations

import ast
import operator
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from ..core.errors import UserError

__all__ = ["Where", "parse_where", "column_kind", "column_values", "KINDS", "REASON_SEPARATOR"]

#: Column kinds an expression can use: "number" (ints and floats), "bool" and "string".
KINDS = ("number", "bool", "string")
#: Joins the failed clauses of one row in its reason.
REASON_SEPARATOR = "; "

_COMPARE: dict[type, Callable[[Any, Any], Any]] = {
    ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt, ast.GtE: operator.ge,
    ast.Eq: operator.eq, ast.NotEq: operator.ne,
}
_ORDERING = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)
# What a refused construct is, in words (the message names it).
_CONSTRUCTS: dict[type, str] = {
    ast.Call: "a function call", ast.Attribute: "an attribute (x.y)", ast.Subscript: "a subscript (x[...])",
    ast.Lambda: "a lambda", ast.BinOp: "arithmetic", ast.IfExp: "an if-expression",
    ast.ListComp: "a comprehension", ast.GeneratorExp: "a comprehension", ast.DictComp: "a comprehension",
    ast.SetComp: "a comprehension", ast.NamedExpr: "an assignment (:=)", ast.Dict: "a dict",
    ast.Starred: "a starred expression", ast.JoinedStr: "an f-string", ast.Await: "await",
}
_SYNTAX = ("comparisons (< <= > >= == != in), and/or/not, parentheses, numbers, strings, True/False and "
           "column names")


@dataclass(frozen=True)
class Where:
    """A checked ``--where`` expression (make one with :func:`parse_where`).

    Attributes:
        text: the expression as given (stripped).
        columns: the columns it reads, in the order they first appear.
        clauses: its top-level ``and`` clauses as written (the whole expression when it is not an ``and``).
        thresholds: per number column, the numbers it is compared with, in order of appearance.
    """

    text: str
    columns: tuple[str, ...]
    clauses: tuple[str, ...]
    thresholds: dict[str, tuple[float, ...]]
    _tree: ast.expr = field(repr=False, compare=False)
    _clause_trees: tuple[ast.expr, ...] = field(repr=False, compare=False)

    def mask(self, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
        """The rows (of ``n``) the expression keeps: a bool array, from ``values`` (a numpy array of ``n``
        values per column it reads)."""
        return _evaluate(self._tree, values, n)

    def clause_masks(self, values: Mapping[str, np.ndarray], n: int) -> list[np.ndarray]:
        """Per clause (``clauses``), the rows that pass it."""
        return [_evaluate(tree, values, n) for tree in self._clause_trees]

    def reasons(self, values: Mapping[str, np.ndarray], n: int) -> tuple[np.ndarray, np.ndarray]:
        """``(kept, reasons)``: the mask, and per row the clauses it fails joined by ``"; "`` (``""`` for a
        kept row). With an ``or`` at the top a dropped row fails the one clause, the whole expression."""
        kept = self.mask(values, n)
        failed = [~m for m in self.clause_masks(values, n)]
        # Rows share few combinations of failed clauses: one string per combination, not per row.
        codes = np.zeros(n, dtype=np.int64)
        for i, f in enumerate(failed):
            codes |= f.astype(np.int64) << i
        reasons = np.full(n, "", dtype=object)
        for code in np.unique(codes[~kept]):
            names = [c for i, c in enumerate(self.clauses) if (int(code) >> i) & 1]
            reasons[(codes == code) & ~kept] = REASON_SEPARATOR.join(names) or self.text
        return kept, reasons


def parse_where(text: str, columns: Mapping[str, str]) -> Where:
    """Check ``text`` against the available ``columns`` (name -> kind, one of :data:`KINDS`); a
    ``UserError`` naming the columns for anything that is not a valid expression of them."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"--where needs an expression, e.g. \"clip_score >= 0.28\"; {_columns_text(columns)}")
    text = text.strip()
    try:
        tree = ast.parse(text, mode="eval").body
    except SyntaxError as e:
        hint = " (compare with ==, not =)" if "=" in text and "==" not in text and "<=" not in text \
            and ">=" not in text and "!=" not in text else ""
        raise UserError(f"--where {text!r} is not a valid expression{hint}: {e.msg} at character {e.offset}; it may "
                        f"use {_SYNTAX}; {_columns_text(columns)}") from None
    checker = _Checker(text, columns)
    if checker.kind(tree) != "bool":
        raise UserError(f"--where {text!r} is not true or false per sample; compare it with something, e.g. "
                        f"\"clip_score >= 0.28\"; {_columns_text(columns)}")
    clause_trees = tuple(tree.values) if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And) else (tree,)
    clauses = tuple(ast.get_source_segment(text, t) or ast.unparse(t) for t in clause_trees)
    return Where(text, tuple(checker.used), clauses, {k: tuple(v) for k, v in checker.thresholds.items()}, tree,
                 clause_trees)


def _columns_text(columns: Mapping[str, str]) -> str:
    usable = [f"{name} ({kind})" for name, kind in columns.items() if kind in KINDS]
    return f"the columns are: {', '.join(usable)}" if usable else "there are no columns"


class _Checker:
    """Walks a parsed expression: refuses what the language lacks and gives each node its kind."""

    def __init__(self, text: str, columns: Mapping[str, str]) -> None:
        self.text = text
        self.columns = columns
        self.used: dict[str, None] = {}  # an ordered set
        self.thresholds: dict[str, list[float]] = {}

    def refuse(self, node: ast.AST, why: str) -> UserError:
        part = ast.get_source_segment(self.text, node) or type(node).__name__
        return UserError(f"--where {self.text!r}: {part!r} is {why}; an expression may use {_SYNTAX}; "
                         f"{_columns_text(self.columns)}")

    def kind(self, node: ast.AST) -> str:
        if isinstance(node, ast.BoolOp):
            for value in node.values:
                self.expect_bool(value)
            return "bool"
        if isinstance(node, ast.UnaryOp):
            if isinstance(node.op, ast.Not):
                self.expect_bool(node.operand)
                return "bool"
            if isinstance(node.op, (ast.USub, ast.UAdd)) and _number_constant(node.operand):
                return "number"
            raise self.refuse(node, "arithmetic")
        if isinstance(node, ast.Compare):
            self.check_compare(node)
            return "bool"
        if isinstance(node, ast.Name):
            if node.id not in self.columns or self.columns[node.id] not in KINDS:
                raise UserError(f"--where {self.text!r}: unknown column {node.id!r}; {_columns_text(self.columns)}")
            self.used[node.id] = None
            return self.columns[node.id]
        if isinstance(node, ast.Constant):
            return self.constant_kind(node)
        raise self.refuse(node, _CONSTRUCTS.get(type(node), f"not part of the language ({type(node).__name__})"))

    def constant_kind(self, node: ast.Constant) -> str:
        if isinstance(node.value, bool):
            return "bool"
        if isinstance(node.value, (int, float)):
            return "number"
        if isinstance(node.value, str):
            return "string"
        raise self.refuse(node, "a constant of another type (only numbers, strings, True/False)")

    def expect_bool(self, node: ast.AST) -> None:
        if self.kind(node) != "bool":
            raise self.refuse(node, "not true or false: compare it with something (e.g. aesthetic >= 5)")

    def check_compare(self, node: ast.Compare) -> None:
        left = node.left
        for op, right in zip(node.ops, node.comparators):
            if isinstance(op, (ast.In, ast.NotIn)):
                self.check_membership(left, right)
            elif isinstance(op, (ast.Is, ast.IsNot)):
                raise self.refuse(node, "an identity test (is); use == or !=")
            else:
                a, b = self.kind(left), self.kind(right)
                if a != b:
                    raise self.refuse(node, f"a comparison of a {a} with a {b}")
                if a == "bool" and isinstance(op, _ORDERING):
                    raise self.refuse(node, "an ordering of true/false values; use == or !=")
                self.note_threshold(left, right)
                self.note_threshold(right, left)
            left = right

    def check_membership(self, left: ast.AST, right: ast.AST) -> None:
        kind = self.kind(left)
        if not isinstance(right, (ast.List, ast.Tuple, ast.Set)) or not right.elts:
            raise self.refuse(right, "not a list of constants ([1, 2] or [\"a\", \"b\"]) after 'in'")
        for element in right.elts:
            if not (isinstance(element, ast.Constant) or _number_constant(element)):
                raise self.refuse(element, "not a constant (the list after 'in' holds numbers or strings)")
            if self.kind(element) != kind:
                raise self.refuse(element, f"a {self.kind(element)} in a list compared with a {kind}")

    def note_threshold(self, column: ast.AST, value: ast.AST) -> None:
        if isinstance(column, ast.Name) and self.columns.get(column.id) == "number" and (
                _number_constant(value) or (isinstance(value, ast.Constant) and type(value.value) in (int, float))):
            self.thresholds.setdefault(column.id, []).append(float(_constant(value)))


def _number_constant(node: ast.AST) -> bool:
    """A number literal, possibly signed (``-1.5`` parses as ``USub(1.5)``)."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        node = node.operand
    return isinstance(node, ast.Constant) and type(node.value) in (int, float)


def _constant(node: ast.AST) -> Any:
    if isinstance(node, ast.UnaryOp):
        value = _constant(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    return node.value  # type: ignore[attr-defined]


def _value(node: ast.AST, values: Mapping[str, np.ndarray]) -> Any:
    if isinstance(node, ast.Name):
        return values[node.id]
    if isinstance(node, (ast.List, ast.Tuple, ast.Set)):
        return [_constant(e) for e in node.elts]
    if isinstance(node, (ast.Constant, ast.UnaryOp)) and not (isinstance(node, ast.UnaryOp)
                                                               and isinstance(node.op, ast.Not)):
        return _constant(node)
    raise AssertionError(f"not a value: {ast.dump(node)}")  # the checker lets nothing else through


def _rows(result: Any, n: int) -> np.ndarray:
    """A per-row bool array (a comparison of two constants is one bool for every row)."""
    array = np.asarray(result, dtype=bool)
    return np.broadcast_to(array, (n,)).copy() if array.shape != (n,) else array


def _evaluate(node: ast.AST, values: Mapping[str, np.ndarray], n: int) -> np.ndarray:
    if isinstance(node, ast.BoolOp):
        parts = [_evaluate(v, values, n) for v in node.values]
        combine = np.logical_and if isinstance(node.op, ast.And) else np.logical_or
        return combine.reduce(parts)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return ~_evaluate(node.operand, values, n)
    if isinstance(node, ast.Compare):
        result = np.ones(n, dtype=bool)
        left = _value(node.left, values)
        for op, comparator in zip(node.ops, node.comparators):
            right = _value(comparator, values)
            if isinstance(op, (ast.In, ast.NotIn)):
                member = _rows(np.isin(left, np.asarray(right, dtype=object if isinstance(right[0], str) else None)), n)
                result &= member if isinstance(op, ast.In) else ~member
            else:
                result &= _rows(_COMPARE[type(op)](left, right), n)
            left = right
        return result
    return _rows(_value(node, values), n)  # a bool column or True/False


def column_kind(arrow_type: Any) -> str | None:
    """The kind (:data:`KINDS`) of a pyarrow type, ``None`` for one an expression cannot use."""
    import pyarrow as pa

    if pa.types.is_boolean(arrow_type):
        return "bool"
    if pa.types.is_integer(arrow_type) or pa.types.is_floating(arrow_type):
        return "number"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "string"
    return None


def column_values(column: Any, kind: str) -> np.ndarray:
    """A pyarrow (chunked) array as the numpy array the evaluation reads: nulls are NaN in numbers,
    False in bools and "" in strings, so a missing value fails a comparison instead of raising."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if kind == "bool":
        return np.asarray(pc.fill_null(column, False).to_numpy(zero_copy_only=False), dtype=bool)
    if kind == "string":
        return np.asarray(pc.fill_null(column, "").to_numpy(zero_copy_only=False), dtype=object)
    return np.asarray(pc.cast(column, pa.float64()).to_numpy(zero_copy_only=False), dtype=np.float64)


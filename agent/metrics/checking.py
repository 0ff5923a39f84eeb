"""Reading typed fields out of located YAML, collecting every problem instead of stopping.

Both configuration formats use one :class:`FileChecker` per file: each accessor returns
the value, or ``None`` after recording a :class:`ConfigProblem` that points at the value::

    checker.text(spec, "match", "rule default/mongoprom")   -> 'context.protocol == "tcp"'
    checker.text(spec, "match", ...) on ``match: 42``       -> None, problem
        "tcp.yaml:9:10: rule default/mongoprom: match must be text, found an integer"
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from agent.model import ValueSource

from .attributes import COUNTED, VOCABULARY
from .documents import Located
from .expressions import (
    AttributeRef,
    Binary,
    CompiledExpression,
    Literal,
    Node,
    ValueType,
    compile_expression,
    compile_tree,
    parse_expression,
    unparse,
)
from .problems import ConfigProblem, ExpressionError

_TYPE_NAMES = {
    str: "text",
    int: "an integer",
    float: "a number",
    bool: "true/false",
    list: "a list",
    dict: "a mapping",
    type(None): "nothing",
}


def kind_of(value: Any) -> str:
    """``"x"`` -> ``"text"``; ``[1]`` -> ``"a list"``; ``{}`` -> ``"a mapping"``."""
    return _TYPE_NAMES.get(type(value), type(value).__name__)


class FileChecker:
    """Problems found in one file, and typed access to its located values."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[ConfigProblem] = []

    def problem(
        self,
        where: Located | None,
        obj: str,
        message: str,
        column: int | None = None,
        line: int | None = None,
    ) -> None:
        self.problems.append(
            ConfigProblem(
                self.file,
                obj,
                line if line is not None else (where.line if where else 0),
                column if column is not None else (where.column if where else 0),
                message,
            )
        )

    def mapping(self, where: Located | None, obj: str, what: str) -> dict[Any, Located] | None:
        if where is None:
            return None
        if not isinstance(where.value, dict):
            self.problem(where, obj, f"{what} must be a mapping, found {kind_of(where.value)}")
            return None
        return where.value

    def field(
        self, parent: Located, fields: dict[Any, Located], key: str, obj: str, required: bool
    ) -> Located | None:
        located = fields.get(key)
        if located is None and required:
            self.problem(parent, obj, f"{key!r} is required")
        return located

    def text(
        self,
        parent: Located,
        fields: dict[Any, Located],
        key: str,
        obj: str,
        required: bool = False,
    ) -> str | None:
        located = self.field(parent, fields, key, obj, required)
        if located is None:
            return None
        if not isinstance(located.value, str) or not located.value:
            self.problem(located, obj, f"{key} must be text, found {kind_of(located.value)}")
            return None
        return located.value

    def boolean(
        self, parent: Located, fields: dict[Any, Located], key: str, obj: str, default: bool
    ) -> bool:
        located = fields.get(key)
        if located is None:
            return default
        if not isinstance(located.value, bool):
            self.problem(
                located, obj, f"{key} must be true or false, found {kind_of(located.value)}"
            )
            return default
        return located.value

    def text_list(
        self, parent: Located, fields: dict[Any, Located], key: str, obj: str
    ) -> list[tuple[str, Located]] | None:
        located = fields.get(key)
        if located is None:
            return None
        if not isinstance(located.value, list):
            self.problem(located, obj, f"{key} must be a list, found {kind_of(located.value)}")
            return None
        items: list[tuple[str, Located]] = []
        for item in located.value:
            if not isinstance(item.value, str) or not item.value:
                self.problem(
                    item, obj, f"each item of {key} must be text, found {kind_of(item.value)}"
                )
            else:
                items.append((item.value, item))
        return items

    def unknown_keys(
        self, where: Located, fields: dict[Any, Located], allowed: set[str], obj: str
    ) -> None:
        for key in fields:
            if key not in allowed:
                hint = ", ".join(sorted(allowed))
                line, column = where.key_position(key)
                self.problem(
                    where,
                    obj,
                    f"unknown field {key!r} (expected one of: {hint})",
                    line=line,
                    column=column,
                )

    def expression(
        self,
        located: Located,
        obj: str,
        role: str,
        expected: ValueType | None = None,
        transform: Callable[[Node], Node] | None = None,
    ) -> CompiledExpression | None:
        """Compile the expression text in ``located``; a problem (with position) if it fails.

        ``expected=None`` is a dimension: text, integer or boolean (a number or boolean
        written unquoted in YAML is taken as that literal, as Mixer did). ``transform``
        rewrites the parsed tree before it is compiled (and may raise ExpressionError).
        """
        value = located.value
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, int):
            value = str(value)
        if not isinstance(value, str):
            self.problem(
                located, obj, f"{role} must be an expression text, found {kind_of(located.value)}"
            )
            return None
        try:
            if transform is None:
                return compile_expression(value, VOCABULARY, expected)
            tree = transform(parse_expression(value))
            return compile_tree(tree, unparse(tree), VOCABULARY, expected)
        except ExpressionError as error:
            self._expression_problem(located, obj, role, error)
            return None

    def _expression_problem(
        self, located: Located, obj: str, role: str, error: ExpressionError
    ) -> None:
        line, column, exact = located.position_of(error.offset)
        message = f"{role}: {error.message}"
        if not exact:
            message += f" (at column {error.offset + 1} of the expression)"
        self.problem(located, obj, message, column=column, line=line)

    def value_source(self, located: Located, obj: str) -> ValueSource | None:
        """What a metric's ``value`` counts.

        ``connection.received.bytes`` or Mixer's ``connection.received.bytes | 0`` ->
        ``ValueSource.RECEIVED_BYTES``; also ``connection.opened`` / ``connection.closed``.
        """
        text = located.value
        allowed = ", ".join(COUNTED)
        if not isinstance(text, str):
            self.problem(located, obj, f"value must be one of {allowed}, found {kind_of(text)}")
            return None
        try:
            tree = parse_expression(text)
        except ExpressionError as error:
            self._expression_problem(located, obj, "value", error)
            return None
        if (
            isinstance(tree, Binary)
            and tree.operator == "|"
            and isinstance(tree.right, Literal)
            and tree.right.type is ValueType.INT
        ):
            tree = tree.left  # Mixer's "| 0": a count that is absent is zero
        if isinstance(tree, AttributeRef) and tree.name in COUNTED:
            return COUNTED[tree.name]
        self.problem(
            located,
            obj,
            f"value must be one of {allowed} (optionally '| 0'): "
            f"tcpacct counts bytes and connections, found {text!r}",
        )
        return None

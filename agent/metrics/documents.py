"""YAML documents whose every value remembers where it was written.

``read_documents`` turns a file into one :class:`Located` tree per YAML document, so that
a problem found later can say ``metrics.yaml:12:9``. Only the safe YAML types are built;
size, nesting and alias expansion are bounded so that a hostile file gives a clear error::

    read_documents(Path("m.yaml"), "a: 1\\n")  -> [Located({"a": Located(1, line=1, column=4)})]
    read_documents(Path("m.yaml"), "a: [")     -> DocumentError("m.yaml:2:1: not YAML: ...")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .problems import ConfigProblem

MAX_FILE_BYTES = 4 * 1024 * 1024
MAX_NODES = 200_000
MAX_DEPTH = 64

_Loader: type = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


@dataclass(slots=True)
class Located:
    """A YAML value (dict of Located, list of Located, or a scalar) and where it starts.

    ``line`` and ``column`` are 1-based. ``folded`` maps a character offset of a text value
    back to its (line, column) in the file when that is possible.
    """

    value: Any
    line: int
    column: int
    folded: list[tuple[int, int, int]] | None = field(default=None, repr=False)
    keys: dict[Any, tuple[int, int]] | None = field(default=None, repr=False)

    def key_position(self, key: Any) -> tuple[int, int]:
        """(line, column) where a mapping's ``key`` is written; the mapping's own if unknown."""
        if self.keys and key in self.keys:
            return self.keys[key]
        return self.line, self.column

    def position_of(self, offset: int) -> tuple[int, int, bool]:
        """(line, column, exact) of character ``offset`` of this text value.

        A plain one-line scalar ``match: a == "b"`` at line 3, column 8: offset 5 ->
        (3, 13, True). When the text cannot be mapped back (escapes, block scalars) the
        scalar's own start is returned with ``exact=False``.
        """
        if self.folded:
            for start, line, column in reversed(self.folded):
                if offset >= start:
                    return line, column + offset - start, True
        return self.line, self.column, False


class DocumentError(Exception):
    """A file that is not usable YAML (one problem)."""

    def __init__(self, problem: ConfigProblem) -> None:
        self.problem = problem
        super().__init__(str(problem))


def _plain_segments(node: yaml.ScalarNode, text: str) -> list[tuple[int, int, int]] | None:
    """Where the pieces of a scalar's text sit in the file.

    A multi-line plain scalar ``a ==\\n     "b"`` folds to ``a == "b"``: pieces
    [(0, line, col), (5, line + 1, col')]. Folded (``>``) and literal (``|``) block scalars
    map the same way, line by line. None when the value cannot be mapped back (escapes,
    blank lines, more-indented lines).
    """
    start, end = node.start_mark, node.end_mark
    if start is None or end is None or start.index is None:
        return None
    raw = text[start.index : end.index]
    style = node.style
    if style in ('"', "'"):
        if "\n" in raw or "\\" in raw or "''" in raw:
            return None
        return [(0, start.line + 1, start.column + 2)]
    first_line = start.line + 1
    first_column = start.column
    separator = " "
    if style in (">", "|"):
        header, _, raw = raw.partition("\n")
        if "#" in header:
            return None
        first_line += 1
        first_column = 0
        separator = " " if style == ">" else "\n"
        raw = raw.rstrip()
    elif style:  # plain scalars have style None (pure Python) or "" (libyaml)
        return None
    segments: list[tuple[int, int, int]] = []
    pieces: list[str] = []
    offset = 0
    for number, physical in enumerate(raw.split("\n")):
        stripped = physical.strip()
        if not stripped:
            return None
        indent = len(physical) - len(physical.lstrip())
        column = (first_column if number == 0 else 0) + indent + 1
        segments.append((offset, first_line + number, column))
        pieces.append(stripped)
        offset += len(stripped) + 1
    if separator.join(pieces) != node.value.rstrip("\n"):
        return None
    return segments


class _Converter:
    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.text = text
        self.count = 0
        self.constructor = yaml.constructor.SafeConstructor()

    def problem(self, node: yaml.Node, message: str) -> DocumentError:
        mark = node.start_mark
        return DocumentError(
            ConfigProblem(str(self.path), "", mark.line + 1, mark.column + 1, message)
        )

    def convert(self, node: yaml.Node, depth: int = 0) -> Located:
        self.count += 1
        if self.count > MAX_NODES:
            raise self.problem(
                node,
                f"too many YAML values (limit is {MAX_NODES}; "
                "aliases count each time they are used)",
            )
        if depth > MAX_DEPTH:
            raise self.problem(node, f"YAML nested too deeply (limit is {MAX_DEPTH})")
        line, column = node.start_mark.line + 1, node.start_mark.column + 1
        if isinstance(node, yaml.MappingNode):
            mapping: dict[Any, Located] = {}
            keys: dict[Any, tuple[int, int]] = {}
            self.constructor.flatten_mapping(node)
            for key_node, value_node in node.value:
                if not isinstance(key_node, yaml.ScalarNode):
                    raise self.problem(key_node, "a mapping key must be a plain value")
                key = self._scalar(key_node)
                if not isinstance(key, str | int | bool) or key is None:
                    raise self.problem(key_node, f"a mapping key must be text, found {key!r}")
                if key in mapping:
                    raise self.problem(key_node, f"key {key!r} appears twice")
                mapping[key] = self.convert(value_node, depth + 1)
                keys[key] = (key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            return Located(mapping, line, column, keys=keys)
        if isinstance(node, yaml.SequenceNode):
            return Located([self.convert(item, depth + 1) for item in node.value], line, column)
        value = self._scalar(node)
        folded = _plain_segments(node, self.text) if isinstance(value, str) else None
        return Located(value, line, column, folded)

    def _scalar(self, node: yaml.ScalarNode) -> Any:
        try:
            return self.constructor.construct_object(node, deep=True)
        except yaml.YAMLError as error:
            raise self.problem(node, f"not a valid value: {error}") from None
        except ValueError as error:  # e.g. an invalid timestamp
            raise self.problem(node, f"not a valid value: {error}") from None


def read_documents(path: Path, text: str | None = None) -> list[Located | None]:
    """The YAML documents of ``path`` (``None`` for an empty document between ``---``).

    ``text`` is read from the file when not given. Raises :class:`DocumentError` when the
    file cannot be read or is not YAML.
    """
    if text is None:
        try:
            with path.open("rb") as stream:
                data = stream.read(MAX_FILE_BYTES + 1)
        except OSError as error:
            raise DocumentError(
                ConfigProblem(str(path), "", 0, 0, f"cannot read: {error.strerror or error}")
            ) from None
        if len(data) > MAX_FILE_BYTES:
            raise DocumentError(
                ConfigProblem(str(path), "", 0, 0, f"file larger than {MAX_FILE_BYTES} bytes")
            )
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise DocumentError(
                ConfigProblem(str(path), "", 0, 0, f"not UTF-8 text (byte {error.start})")
            ) from None
    try:
        nodes = list(yaml.compose_all(text, Loader=_Loader))
    except yaml.MarkedYAMLError as error:
        mark = error.problem_mark or error.context_mark
        line, column = (mark.line + 1, mark.column + 1) if mark is not None else (0, 0)
        reason = error.problem or error.context or "syntax error"
        raise DocumentError(
            ConfigProblem(str(path), "", line, column, f"not YAML: {reason}")
        ) from None
    except yaml.YAMLError as error:
        raise DocumentError(ConfigProblem(str(path), "", 0, 0, f"not YAML: {error}")) from None
    except RecursionError:
        raise DocumentError(
            ConfigProblem(str(path), "", 0, 0, "not usable YAML: nested too deeply")
        ) from None
    converter = _Converter(path, text)
    return [None if node is None else converter.convert(node) for node in nodes]

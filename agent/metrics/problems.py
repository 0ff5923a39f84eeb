"""What goes wrong in a metrics configuration, said so that a user can find and fix it.

Every problem names the file, the object in it (``metric istio_mongo_received_bytes``,
``rule default/mongoprom``) and a position, one message per problem::

    ConfigProblem("tcp.yaml", "rule default/mongoprom", 58, 12, "unknown attribute ...")
    -> "tcp.yaml:58:12: rule default/mongoprom: unknown attribute ..."
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong in one configuration file (``line``/``column`` are 1-based, 0 = unknown)."""

    file: str
    object: str
    line: int
    column: int
    message: str

    def __str__(self) -> str:
        where = self.file
        if self.line:
            where += f":{self.line}"
            if self.column:
                where += f":{self.column}"
        if self.object:
            return f"{where}: {self.object}: {self.message}"
        return f"{where}: {self.message}"


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` says everything that is wrong with it."""

    def __init__(self, problems: Sequence[ConfigProblem]) -> None:
        self.problems = tuple(problems)
        super().__init__("\n".join(str(problem) for problem in self.problems))


class ExpressionError(Exception):
    """An expression that does not compile; ``offset`` is the 0-based character it concerns."""

    def __init__(self, message: str, offset: int) -> None:
        self.message = message
        self.offset = offset
        super().__init__(f"column {offset + 1}: {message}")

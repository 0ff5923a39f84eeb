"""Mixer's configuration expression language (CEXL), as far as it means something at L4.

An expression is parsed and type-checked once and compiled to a Python closure over
``ConnectionAttributes``; nothing of the user's text is ever passed to ``eval``. What is
supported (a subset of Go expression syntax, as Mixer had it)::

    ==  !=  &&  ||  !  ( )                 comparison and logic
    a | b | "default"                      first operand that is present
    source.labels["app"]                   map access
    "x"  `raw`  42  true  false            literals
    conditional(cond, a, b)                a if cond else b (Istio's default config uses it)
    match(s, "*.svc.cluster.local")        Mixer's glob: prefix*, *suffix or exact
    s.startsWith("x")  s.endsWith("x")     also as functions: startsWith(s, "x")
    ip("198.18.0.1")                       a canonical address text, compared to source.ip

Missing attributes follow Mixer: an attribute that is not known (``"unknown"`` in the
model, an empty text, port 0, a label that is not set) is *absent*; ``a | b`` gives ``b``
then. Comparing or testing something absent is an evaluation error, which makes a
``match`` false (Mixer did not apply the rule) and a dimension ``"unknown"``. ``false && x``
and ``true || x`` do not look at ``x``.

Examples (``attributes`` from a ratings-v2 pod talking to mongodb)::

    compile_expression('source.labels["version"] | "unknown"', VOCABULARY).evaluate(attributes)
    -> "v2"
    compile_expression('destination.service.host == "mongodb.default.svc.cluster.local"',
                       VOCABULARY, expected=ValueType.BOOL).evaluate(attributes)
    -> True
"""

from __future__ import annotations

import enum
import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from difflib import get_close_matches
from typing import Any

from agent.metrics.problems import ExpressionError

MAX_EXPRESSION_LENGTH = 4096
MAX_DEPTH = 32
MAX_NODES = 512
MAX_INT = 2**63 - 1

Evaluator = Callable[[Any], Any]  # attributes -> value, or None when absent / in error


class ValueType(enum.Enum):
    """Types of the language (Mixer's ValueType, restricted to what L4 attributes have)."""

    STRING = "string"
    INT = "int"
    BOOL = "bool"
    STRING_MAP = "map[string]string"


@dataclass(frozen=True, slots=True)
class Attribute:
    """One name of the vocabulary: its type and how to read it from connection attributes.

    ``read(attributes)`` returns the value or ``None`` when it is not known. A map attribute
    has ``lookup(attributes, key)`` instead. ``misuse`` is set on names that exist but may
    not appear in an expression (what a metric counts): the error to give when they do.
    """

    name: str
    type: ValueType
    description: str
    read: Callable[[Any], Any] | None = None
    lookup: Callable[[Any, str], str | None] | None = None
    misuse: str | None = None


@dataclass(frozen=True, slots=True)
class CompiledExpression:
    """An expression ready to evaluate: ``evaluate(attributes)`` -> value or ``None``."""

    text: str
    type: ValueType
    evaluate: Evaluator
    tree: Node


# --------------------------------------------------------------------------- tokens


class _Tok(enum.Enum):
    IDENT = "identifier"
    STRING = "string"
    INT = "integer"
    OP = "operator"
    END = "end of expression"


@dataclass(frozen=True, slots=True)
class _Token:
    kind: _Tok
    text: str
    offset: int
    value: Any = None


_TWO_CHAR_OPERATORS = {"==", "!=", "&&", "||"}
_ONE_CHAR_OPERATORS = set("|!()[],.")
_UNSUPPORTED = {
    "<": "comparison '<'",
    ">": "comparison '>'",
    "+": "operator '+'",
    "-": "operator '-'",
    "*": "operator '*'",
    "/": "operator '/'",
    "%": "operator '%'",
    "^": "operator '^'",
    "&": "operator '&'",
    "=": "assignment '=' (did you mean '=='?)",
    "'": "single quotes (strings use double quotes)",
}
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'"}


def _tokenize(text: str) -> list[_Token]:
    """``'a.b == "x"'`` -> IDENT a, OP ., IDENT b, OP ==, STRING x, END."""
    tokens: list[_Token] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c.isascii() and (c.isalpha() or c == "_"):
            j = i + 1
            while j < n and text[j].isascii() and (text[j].isalnum() or text[j] == "_"):
                j += 1
            tokens.append(_Token(_Tok.IDENT, text[i:j], i))
            i = j
        elif c.isascii() and c.isdigit():
            j = i + 1
            while j < n and text[j].isascii() and text[j].isdigit():
                j += 1
            if j < n and (text[j].isalpha() or text[j] in "._"):
                raise ExpressionError(f"malformed number {text[i : j + 1]!r}", i)
            if j - i > 19 or int(text[i:j]) > MAX_INT:
                raise ExpressionError("integer too large (limit is 2^63-1)", i)
            tokens.append(_Token(_Tok.INT, text[i:j], i, int(text[i:j])))
            i = j
        elif c == '"':
            i = _string(text, i, tokens)
        elif c == "`":
            j = text.find("`", i + 1)
            if j < 0:
                raise ExpressionError("raw string not terminated (missing `)", i)
            tokens.append(_Token(_Tok.STRING, text[i : j + 1], i, text[i + 1 : j]))
            i = j + 1
        elif text[i : i + 2] in _TWO_CHAR_OPERATORS:
            tokens.append(_Token(_Tok.OP, text[i : i + 2], i))
            i += 2
        elif c in _ONE_CHAR_OPERATORS:
            tokens.append(_Token(_Tok.OP, c, i))
            i += 1
        elif c in _UNSUPPORTED:
            raise ExpressionError(f"{_UNSUPPORTED[c]} is not supported", i)
        else:
            raise ExpressionError(f"unexpected character {c!r}", i)
    tokens.append(_Token(_Tok.END, "", n))
    return tokens


def _string(text: str, start: int, tokens: list[_Token]) -> int:
    """Append the Go-style double-quoted string at ``start``; return the offset after it."""
    out: list[str] = []
    i, n = start + 1, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            tokens.append(_Token(_Tok.STRING, text[start : i + 1], start, "".join(out)))
            return i + 1
        if c == "\n":
            break
        if c == "\\":
            if i + 1 >= n:
                break
            escaped = text[i + 1]
            if escaped not in _ESCAPES:
                raise ExpressionError(f"unknown escape sequence '\\{escaped}' in string", i)
            out.append(_ESCAPES[escaped])
            i += 2
            continue
        out.append(c)
        i += 1
    raise ExpressionError('string not terminated (missing ")', start)


# --------------------------------------------------------------------------- syntax tree


@dataclass(frozen=True, slots=True)
class Node:
    """A node of the syntax tree; ``offset`` points at its first character in the text."""

    offset: int
    depth: int


@dataclass(frozen=True, slots=True)
class Literal(Node):
    value: Any
    type: ValueType


@dataclass(frozen=True, slots=True)
class AttributeRef(Node):
    name: str


@dataclass(frozen=True, slots=True)
class Index(Node):
    target: Node
    key: Node


@dataclass(frozen=True, slots=True)
class Call(Node):
    function: str
    args: tuple[Node, ...]


@dataclass(frozen=True, slots=True)
class Unary(Node):
    operator: str
    operand: Node


@dataclass(frozen=True, slots=True)
class Binary(Node):
    operator: str
    left: Node
    right: Node


class _Parser:
    """Recursive descent with Go's precedence: ``||`` < ``&&`` < ``== !=`` < ``|`` < unary."""

    def __init__(self, text: str) -> None:
        self.tokens = _tokenize(text)
        self.position = 0
        self.nodes = 0
        self.nesting = 0

    def parse(self) -> Node:
        node = self._or()
        token = self._peek()
        if token.kind is not _Tok.END:
            raise ExpressionError(
                f"unexpected {_describe(token)} after a complete expression", token.offset
            )
        return node

    # helpers
    def _peek(self, ahead: int = 0) -> _Token:
        return self.tokens[min(self.position + ahead, len(self.tokens) - 1)]

    def _next(self) -> _Token:
        token = self._peek()
        self.position += 1
        return token

    def _accept(self, operator: str) -> _Token | None:
        token = self._peek()
        if token.kind is _Tok.OP and token.text == operator:
            self.position += 1
            return token
        return None

    def _expect(self, operator: str, what: str) -> _Token:
        token = self._accept(operator)
        if token is None:
            found = self._peek()
            raise ExpressionError(
                f"expected '{operator}' {what}, found {_describe(found)}", found.offset
            )
        return token

    def _node(self, cls: type[Node], offset: int, *args: Any) -> Node:
        children = [a for a in args if isinstance(a, Node)]
        children += [a for arg in args if isinstance(arg, tuple) for a in arg]
        depth = 1 + max((child.depth for child in children), default=0)
        self.nodes += 1
        if depth > MAX_DEPTH:
            raise ExpressionError(f"expression nested too deeply (limit is {MAX_DEPTH})", offset)
        if self.nodes > MAX_NODES:
            raise ExpressionError(f"expression too large (limit is {MAX_NODES} terms)", offset)
        return cls(offset, depth, *args)

    def _enter(self, offset: int) -> None:
        self.nesting += 1
        if self.nesting > MAX_DEPTH:
            raise ExpressionError(f"expression nested too deeply (limit is {MAX_DEPTH})", offset)

    # grammar
    def _binary_level(self, operators: tuple[str, ...], operand: Callable[[], Node]) -> Node:
        left = operand()
        while True:
            token = self._peek()
            if token.kind is not _Tok.OP or token.text not in operators:
                return left
            self.position += 1
            right = operand()
            left = self._node(Binary, token.offset, token.text, left, right)

    def _or(self) -> Node:
        return self._binary_level(("||",), self._and)

    def _and(self) -> Node:
        return self._binary_level(("&&",), self._comparison)

    def _comparison(self) -> Node:
        return self._binary_level(("==", "!="), self._default)

    def _default(self) -> Node:
        return self._binary_level(("|",), self._unary)

    def _unary(self) -> Node:
        token = self._accept("!")
        if token is None:
            return self._postfix()
        self._enter(token.offset)
        operand = self._unary()
        self.nesting -= 1
        return self._node(Unary, token.offset, "!", operand)

    def _postfix(self) -> Node:
        node = self._primary()
        while True:
            bracket = self._accept("[")
            if bracket is not None:
                self._enter(bracket.offset)
                key = self._or()
                self.nesting -= 1
                self._expect("]", "to close the map access")
                node = self._node(Index, node.offset, node, key)
                continue
            if self._peek().text == "." and self._peek().kind is _Tok.OP:
                dot = self._next()
                method = self._next()
                if method.kind is not _Tok.IDENT or self._peek().text != "(":
                    raise ExpressionError(
                        'expected a method call such as .startsWith("x")', dot.offset
                    )
                args = self._arguments()
                node = self._node(Call, method.offset, method.text, (node, *args))
                continue
            return node

    def _arguments(self) -> tuple[Node, ...]:
        opening = self._expect("(", "to start the arguments")
        self._enter(opening.offset)
        args: list[Node] = []
        if self._accept(")") is None:
            while True:
                args.append(self._or())
                if self._accept(")") is not None:
                    break
                self._expect(",", "between arguments")
        self.nesting -= 1
        return tuple(args)

    def _primary(self) -> Node:
        token = self._next()
        if token.kind is _Tok.STRING:
            return self._node(Literal, token.offset, token.value, ValueType.STRING)
        if token.kind is _Tok.INT:
            return self._node(Literal, token.offset, token.value, ValueType.INT)
        if token.kind is _Tok.OP and token.text == "(":
            self._enter(token.offset)
            inner = self._or()
            self.nesting -= 1
            self._expect(")", "to close the parenthesis")
            return inner
        if token.kind is not _Tok.IDENT:
            raise ExpressionError(f"expected a value, found {_describe(token)}", token.offset)
        # A dotted name: an attribute, unless its last part is followed by '(' (a call).
        parts = [token.text]
        while (
            self._peek().text == "."
            and self._peek(1).kind is _Tok.IDENT
            and self._peek(2).text != "("
        ):
            self.position += 1
            parts.append(self._next().text)
        if self._peek().text == "(" and self._peek().kind is _Tok.OP:
            if len(parts) > 1:
                raise ExpressionError(f"unknown function {'.'.join(parts)!r}", token.offset)
            return self._node(Call, token.offset, token.text, self._arguments())
        name = ".".join(parts)
        if name in ("true", "false"):
            return self._node(Literal, token.offset, name == "true", ValueType.BOOL)
        return self._node(AttributeRef, token.offset, name)


def _describe(token: _Token) -> str:
    if token.kind is _Tok.END:
        return "the end of the expression"
    return f"{token.kind.value} {token.text!r}"


def parse_expression(text: str) -> Node:
    """Text -> syntax tree, or :class:`ExpressionError` saying where and what is wrong.

    ``'a | "x"'`` -> ``Binary("|", AttributeRef("a"), Literal("x"))``.
    """
    if not isinstance(text, str):
        raise ExpressionError(f"expected an expression text, found {type(text).__name__}", 0)
    if len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(
            f"expression too long ({len(text)} characters, limit is {MAX_EXPRESSION_LENGTH})", 0
        )
    if not text.strip():
        raise ExpressionError("empty expression", 0)
    return _Parser(text).parse()


# --------------------------------------------------------------------------- compiler


@dataclass(frozen=True, slots=True)
class _Typed:
    type: ValueType
    evaluate: Evaluator
    constant: bool = False  # evaluates to the same value whatever the attributes


def _constant(value: Any, value_type: ValueType) -> _Typed:
    return _Typed(value_type, lambda _attributes: value, constant=True)


class _Compiler:
    def __init__(self, vocabulary: Mapping[str, Attribute]) -> None:
        self.vocabulary = vocabulary

    def compile(self, node: Node) -> _Typed:
        method = getattr(self, f"_{type(node).__name__.lower()}")
        return method(node)

    def _literal(self, node: Literal) -> _Typed:
        return _constant(node.value, node.type)

    def _attribute(self, name: str, offset: int) -> Attribute:
        attribute = self.vocabulary.get(name)
        if attribute is None:
            message = f"unknown attribute {name!r}"
            close = get_close_matches(name, list(self.vocabulary), n=1)
            if close:
                message += f" (did you mean {close[0]!r}?)"
            raise ExpressionError(message, offset)
        if attribute.misuse is not None:
            raise ExpressionError(f"{name!r} {attribute.misuse}", offset)
        return attribute

    def _attributeref(self, node: AttributeRef) -> _Typed:
        attribute = self._attribute(node.name, node.offset)
        if attribute.type is ValueType.STRING_MAP:
            raise ExpressionError(
                f'{node.name!r} is a map: use it with a key, e.g. {node.name}["app"]',
                node.offset,
            )
        assert attribute.read is not None
        return _Typed(attribute.type, attribute.read)

    def _index(self, node: Index) -> _Typed:
        if not isinstance(node.target, AttributeRef):
            raise ExpressionError("map access [ ] applies to a map attribute", node.offset)
        attribute = self._attribute(node.target.name, node.target.offset)
        if attribute.type is not ValueType.STRING_MAP or attribute.lookup is None:
            raise ExpressionError(
                f"type error: {node.target.name!r} is {attribute.type.value}, not a map",
                node.offset,
            )
        key = self._require(node.key, ValueType.STRING, "a map key")
        lookup = attribute.lookup
        if key.constant:
            constant_key = key.evaluate(None)
            return _Typed(ValueType.STRING, lambda a: lookup(a, constant_key))
        key_of = key.evaluate

        def indexed(a: Any) -> Any:
            k = key_of(a)
            return None if k is None else lookup(a, k)

        return _Typed(ValueType.STRING, indexed)

    def _require(self, node: Node, wanted: ValueType, role: str) -> _Typed:
        typed = self.compile(node)
        if typed.type is not wanted:
            raise ExpressionError(
                f"type error: {role} must be {wanted.value}, found {typed.type.value}",
                node.offset,
            )
        return typed

    def _unary(self, node: Unary) -> _Typed:
        operand = self._require(node.operand, ValueType.BOOL, "the operand of '!'")
        inner = operand.evaluate

        def negated(a: Any) -> Any:
            value = inner(a)
            return None if value is None else not value

        return _Typed(ValueType.BOOL, negated, operand.constant)

    def _binary(self, node: Binary) -> _Typed:
        if node.operator in ("&&", "||"):
            left = self._require(node.left, ValueType.BOOL, f"the left side of '{node.operator}'")
            right = self._require(
                node.right, ValueType.BOOL, f"the right side of '{node.operator}'"
            )
            return _Typed(ValueType.BOOL, _logic(node.operator, left.evaluate, right.evaluate))
        left = self.compile(node.left)
        right = self.compile(node.right)
        if left.type is not right.type:
            raise ExpressionError(
                f"type error: '{node.operator}' needs both sides of one type, "
                f"found {left.type.value} and {right.type.value}",
                node.offset,
            )
        if node.operator == "|":
            return _Typed(left.type, _first_present(left, right), left.constant)
        return _Typed(ValueType.BOOL, _comparison(node.operator == "==", left, right))

    def _call(self, node: Call) -> _Typed:
        function = _FUNCTIONS.get(node.function)
        if function is None:
            if node.function == "matches":
                raise ExpressionError(
                    "'.matches' (regular expressions) is not supported: use match() with a "
                    "glob, startsWith or endsWith",
                    node.offset,
                )
            raise ExpressionError(f"unknown function {node.function!r}", node.offset)
        return function(self, node)


def _logic(operator: str, left: Evaluator, right: Evaluator) -> Evaluator:
    if operator == "&&":

        def conjunction(a: Any) -> Any:
            value = left(a)
            if value is None:
                return None
            return right(a) if value else False

        return conjunction

    def disjunction(a: Any) -> Any:
        value = left(a)
        if value is None:
            return None
        return True if value else right(a)

    return disjunction


def _first_present(left: _Typed, right: _Typed) -> Evaluator:
    read_left, read_right = left.evaluate, right.evaluate
    if right.constant:  # the usual `attribute | "unknown"`: one call, not two
        default = read_right(None)
        return lambda a: default if (v := read_left(a)) is None else v

    def first(a: Any) -> Any:
        value = read_left(a)
        return read_right(a) if value is None else value

    return first


def _comparison(equal: bool, left: _Typed, right: _Typed) -> Evaluator:
    read_left, read_right = left.evaluate, right.evaluate
    if right.constant:
        constant = read_right(None)
        if equal:
            return lambda a: None if (v := read_left(a)) is None else v == constant
        return lambda a: None if (v := read_left(a)) is None else v != constant

    def compare(a: Any) -> Any:
        x, y = read_left(a), read_right(a)
        if x is None or y is None:
            return None
        return (x == y) if equal else (x != y)

    return compare


def _arity(node: Call, count: int, usage: str) -> None:
    if len(node.args) != count:
        raise ExpressionError(
            f"{node.function}() takes {count} arguments ({usage}), found {len(node.args)}",
            node.offset,
        )


def _call_conditional(compiler: _Compiler, node: Call) -> _Typed:
    _arity(node, 3, "condition, value if true, value if false")
    condition = compiler._require(node.args[0], ValueType.BOOL, "the condition of conditional()")
    when_true = compiler.compile(node.args[1])
    when_false = compiler.compile(node.args[2])
    if when_true.type is not when_false.type:
        raise ExpressionError(
            "type error: conditional() needs both values of one type, "
            f"found {when_true.type.value} and {when_false.type.value}",
            node.offset,
        )
    test, yes, no = condition.evaluate, when_true.evaluate, when_false.evaluate

    def conditional(a: Any) -> Any:
        value = test(a)
        if value is None:
            return None
        return yes(a) if value else no(a)

    return _Typed(when_true.type, conditional)


def _string_test(compiler: _Compiler, node: Call, test: Callable[[str, str], bool]) -> _Typed:
    _arity(node, 2, "text, pattern")
    text = compiler._require(node.args[0], ValueType.STRING, f"the text of {node.function}()")
    pattern = compiler._require(node.args[1], ValueType.STRING, f"the pattern of {node.function}()")
    read_text, read_pattern = text.evaluate, pattern.evaluate
    if pattern.constant:
        constant = read_pattern(None)
        return _Typed(
            ValueType.BOOL, lambda a: None if (v := read_text(a)) is None else test(v, constant)
        )

    def tested(a: Any) -> Any:
        value, p = read_text(a), read_pattern(a)
        if value is None or p is None:
            return None
        return test(value, p)

    return _Typed(ValueType.BOOL, tested)


def glob_match(text: str, pattern: str) -> bool:
    """Mixer's ``match``: ``"svc1.*"`` is a prefix, ``"*.ns1.svc"`` a suffix, else exact.

    ``glob_match("a.ns1.svc", "*.ns1.svc")`` -> True; ``glob_match("svc2", "svc1*")`` -> False.
    """
    if pattern.endswith("*"):
        return text.startswith(pattern[:-1])
    if pattern.startswith("*"):
        return text.endswith(pattern[1:])
    return text == pattern


def _call_ip(compiler: _Compiler, node: Call) -> _Typed:
    _arity(node, 1, "an address text")
    argument = node.args[0]
    if not isinstance(argument, Literal) or argument.type is not ValueType.STRING:
        raise ExpressionError("ip() takes a string literal", node.offset)
    try:
        address = ipaddress.ip_address(argument.value)
    except ValueError:
        raise ExpressionError(
            f"ip(): {argument.value!r} is not an IP address", argument.offset
        ) from None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return _constant(str(address), ValueType.STRING)


_FUNCTIONS: dict[str, Callable[[_Compiler, Call], _Typed]] = {
    "conditional": _call_conditional,
    "match": lambda c, n: _string_test(c, n, glob_match),
    "startsWith": lambda c, n: _string_test(c, n, str.startswith),
    "endsWith": lambda c, n: _string_test(c, n, str.endswith),
    "ip": _call_ip,
}


def compile_tree(
    tree: Node, text: str, vocabulary: Mapping[str, Attribute], expected: ValueType | None = None
) -> CompiledExpression:
    """Type-check and compile a parsed ``tree`` (whose source is ``text``)."""
    typed = _Compiler(vocabulary).compile(tree)
    if expected is not None and typed.type is not expected:
        raise ExpressionError(
            f"type error: the expression must be {expected.value}, found {typed.type.value}",
            tree.offset,
        )
    return CompiledExpression(text, typed.type, typed.evaluate, tree)


def compile_expression(
    text: str, vocabulary: Mapping[str, Attribute], expected: ValueType | None = None
) -> CompiledExpression:
    """Parse, type-check and compile ``text``; :class:`ExpressionError` if it cannot be.

    ``expected`` is the type the result must have (``BOOL`` for a match); ``None`` accepts any
    text, integer or boolean (a dimension). ``'source.port | "x"'`` -> type error at column 13.
    """
    return compile_tree(parse_expression(text), text, vocabulary, expected)


def quote(text: str) -> str:
    """A Go string literal: ``'say "hi"'`` -> ``'"say \\"hi\\""'``."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + escaped.replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + '"'


_PRECEDENCE = {"||": 1, "&&": 2, "==": 3, "!=": 3, "|": 4}


def unparse(node: Node, parent_precedence: int = 0) -> str:
    """Text of a syntax tree, parenthesised only where needed.

    ``Binary("&&", a == "x", b)`` -> ``'a == "x" && b'``.
    """
    if isinstance(node, Literal):
        if node.type is ValueType.STRING:
            return quote(node.value)
        return (
            ("true" if node.value else "false") if node.type is ValueType.BOOL else str(node.value)
        )
    if isinstance(node, AttributeRef):
        return node.name
    if isinstance(node, Index):
        return f"{unparse(node.target, 9)}[{unparse(node.key)}]"
    if isinstance(node, Call):
        return f"{node.function}({', '.join(unparse(arg) for arg in node.args)})"
    if isinstance(node, Unary):
        return "!" + unparse(node.operand, 8)
    assert isinstance(node, Binary)
    precedence = _PRECEDENCE[node.operator]
    # Operands of == and != that use | keep their parentheses, for the reader's sake.
    inner = precedence + 2 if precedence == 3 else precedence
    text = (
        f"{unparse(node.left, inner)} {node.operator} "
        f"{unparse(node.right, max(inner, precedence + 1))}"
    )
    return f"({text})" if precedence < parent_precedence else text

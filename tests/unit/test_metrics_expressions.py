"""The Mixer expression language: parsing, type checking, evaluation, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.metrics.attributes import VOCABULARY, lookup, read
from agent.metrics.expressions import (
    MAX_DEPTH,
    MAX_EXPRESSION_LENGTH,
    ValueType,
    compile_expression,
    glob_match,
    parse_expression,
    unparse,
)
from agent.metrics.problems import ExpressionError
from agent.model import ConnectionAttributes, PeerIdentity, Reporter, ServiceIdentity

RATINGS_V2 = PeerIdentity(
    workload="ratings-v2",
    namespace="default",
    pod_name="ratings-v2-5d8f7c-abcde",
    uid="kubernetes://ratings-v2-5d8f7c-abcde.default",
    ip="198.18.0.12",
    port=41234,
    labels={"app": "ratings", "version": "v2"},
)
MONGODB_V1 = PeerIdentity(
    workload="mongodb-v1",
    namespace="default",
    pod_name="mongodb-v1-7c9d-fghij",
    principal="spiffe://cluster.local/ns/default/sa/bookinfo-mongodb",
    ip="198.18.0.20",
    port=27017,
    labels={"app": "mongodb", "version": "v1"},
)
MONGODB_SERVICE = ServiceIdentity("mongodb.default.svc.cluster.local", "mongodb", "default")
AT_DESTINATION = ConnectionAttributes(Reporter.DESTINATION, RATINGS_V2, MONGODB_V1, MONGODB_SERVICE)
AT_SOURCE = ConnectionAttributes(Reporter.SOURCE, RATINGS_V2, MONGODB_V1, MONGODB_SERVICE)
NOTHING_KNOWN = ConnectionAttributes(Reporter.DESTINATION, PeerIdentity(), PeerIdentity())


def evaluate(
    text: str, attributes: ConnectionAttributes = AT_DESTINATION, expected: ValueType | None = None
) -> object:
    return compile_expression(text, VOCABULARY, expected).evaluate(attributes)


def error_of(text: str, expected: ValueType | None = None) -> ExpressionError:
    with pytest.raises(ExpressionError) as caught:
        compile_expression(text, VOCABULARY, expected)
    return caught.value


# --------------------------------------------------------------------------- vocabulary


@pytest.mark.parametrize(
    ("name", "attributes", "value"),
    [
        ("source.workload.name", AT_DESTINATION, "ratings-v2"),
        ("source.workload.namespace", AT_DESTINATION, "default"),
        ("source.namespace", AT_DESTINATION, "default"),
        ("source.name", AT_DESTINATION, "ratings-v2-5d8f7c-abcde"),
        ("source.uid", AT_DESTINATION, "kubernetes://ratings-v2-5d8f7c-abcde.default"),
        ("source.ip", AT_DESTINATION, "198.18.0.12"),
        ("source.port", AT_DESTINATION, 41234),
        ("source.principal", AT_DESTINATION, None),
        ("source.service", AT_DESTINATION, "ratings-v2"),
        (
            "destination.principal",
            AT_DESTINATION,
            "spiffe://cluster.local/ns/default/sa/bookinfo-mongodb",
        ),
        ("destination.port", AT_DESTINATION, 27017),
        ("destination.service.host", AT_DESTINATION, "mongodb.default.svc.cluster.local"),
        ("destination.service", AT_DESTINATION, "mongodb.default.svc.cluster.local"),
        ("destination.service.name", AT_DESTINATION, "mongodb"),
        ("destination.service.namespace", AT_DESTINATION, "default"),
        ("context.protocol", AT_DESTINATION, "tcp"),
        ("context.reporter.kind", AT_DESTINATION, "inbound"),
        ("context.reporter.kind", AT_SOURCE, "outbound"),
        ("connection.mtls", AT_DESTINATION, None),
        ("source.workload.name", NOTHING_KNOWN, None),
        ("source.ip", NOTHING_KNOWN, None),
        ("source.port", NOTHING_KNOWN, None),
        ("destination.service.host", NOTHING_KNOWN, None),
    ],
)
def test_attribute_reads_connection_attributes(name, attributes, value):
    assert read(name, attributes) == value


def test_labels_lookup_falls_back_on_identity_fields():
    local = PeerIdentity(workload="ratings", app="ratings", version="v9", labels={})
    attributes = ConnectionAttributes(Reporter.SOURCE, local, PeerIdentity())
    assert lookup("source.labels", attributes, "app") == "ratings"
    assert lookup("source.labels", attributes, "version") == "v9"
    assert lookup("source.labels", attributes, "tier") is None
    assert lookup("destination.labels", attributes, "app") is None
    assert lookup("destination.labels", AT_DESTINATION, "version") == "v1"


# --------------------------------------------------------------------------- evaluation


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('source.labels["version"] | "unknown"', "v2"),
        ('source.labels["tier"] | "unknown"', "unknown"),
        ('source.labels["tier"] | source.labels["app"] | "x"', "ratings"),
        ('source.principal | "unknown"', "unknown"),
        ("source.port | 0", 41234),
        ('context.protocol == "tcp"', True),
        ('context.protocol != "tcp"', False),
        (
            'context.protocol == "tcp" && destination.service.host == '
            '"mongodb.default.svc.cluster.local"',
            True,
        ),
        ('context.protocol == "udp" || destination.port == 27017', True),
        ('!(context.protocol == "tcp")', False),
        ("!!true", True),
        ("true && false || true", True),
        ("true && (false || false)", False),
        ("destination.port == 27017", True),
        (
            'conditional(context.reporter.kind == "outbound", "source", "destination")',
            "destination",
        ),
        ('match(destination.service.host, "*.default.svc.cluster.local")', True),
        ('match(destination.service.host, "mongodb.*")', True),
        ('match(destination.service.host, "mongo")', False),
        ('destination.service.host.startsWith("mongodb.")', True),
        ('destination.service.host.endsWith(".svc.cluster.local")', True),
        ('source.labels["app"].startsWith("rat")', True),
        ('startsWith(source.workload.name, "ratings")', True),
        ('endsWith(source.workload.name, "v1")', False),
        ('source.ip == ip("198.18.0.12")', True),
        ('source.ip == ip("::ffff:198.18.0.12")', True),
        ('`raw \\n` == "raw \\\\n"', True),
        ('"a\\"b" == `a"b`', True),
        ("42", 42),
        ("false", False),
    ],
)
def test_evaluates_like_mixer(text, value):
    assert evaluate(text) == value


@pytest.mark.parametrize(
    ("text", "value"),
    [
        # Comparing something absent is an evaluation error (None), as in Mixer ...
        ('source.principal == "x"', None),
        ('source.principal != "x"', None),
        ('!(source.principal == "x")', None),
        ('true && source.principal == "x"', None),
        ('false || source.principal == "x"', None),
        ('conditional(source.principal == "x", "a", "b")', None),
        ('source.principal.startsWith("spiffe")', None),
        # ... unless a default takes its place, or the other side decides alone.
        ('(source.principal | "nobody") == "nobody"', True),
        ('false && source.principal == "x"', False),
        ('true || source.principal == "x"', True),
        ("connection.mtls | false", False),
    ],
)
def test_absent_attributes(text, value):
    assert evaluate(text) is value


def test_glob_match():
    assert glob_match("a.ns1.svc", "*.ns1.svc")
    assert glob_match("svc1.x", "svc1.*")
    assert not glob_match("svc2", "svc1*")
    assert glob_match("exact", "exact")
    assert not glob_match("exactly", "exact")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("text", "expected", "offset", "message"),
    [
        (
            "source.wrkload.name",
            None,
            0,
            "unknown attribute 'source.wrkload.name' (did you mean 'source.workload.name'?)",
        ),
        (
            'source.port | "x"',
            None,
            12,
            "type error: '|' needs both sides of one type, found int and string",
        ),
        (
            "context.protocol == 6",
            None,
            17,
            "type error: '==' needs both sides of one type, found string and int",
        ),
        (
            "source.workload.name",
            ValueType.BOOL,
            0,
            "type error: the expression must be bool, found string",
        ),
        (
            'context.protocol == "tcp" &&',
            ValueType.BOOL,
            28,
            "expected a value, found the end of the expression",
        ),
        (
            '(context.protocol == "tcp"',
            ValueType.BOOL,
            26,
            "expected ')' to close the parenthesis, found the end of the expression",
        ),
        ('context.protocol == "tcp', ValueType.BOOL, 20, 'string not terminated (missing ")'),
        (
            'context.protocol = "tcp"',
            ValueType.BOOL,
            17,
            "assignment '=' (did you mean '=='?) is not supported",
        ),
        ("source.port > 5", ValueType.BOOL, 12, "comparison '>' is not supported"),
        (
            "source.labels",
            None,
            0,
            "'source.labels' is a map: use it with a key, e.g. source.labels[\"app\"]",
        ),
        (
            'source.workload.name["x"]',
            None,
            0,
            "type error: 'source.workload.name' is string, not a map",
        ),
        ("source.labels[1]", None, 14, "type error: a map key must be string, found int"),
        (
            "!source.workload.name",
            None,
            1,
            "type error: the operand of '!' must be bool, found string",
        ),
        (
            "connection.sent.bytes",
            None,
            0,
            "'connection.sent.bytes' is what a metric counts: use it as the metric's value, "
            "not in a match or a dimension",
        ),
        ('toUpper("x")', None, 0, "unknown function 'toUpper'"),
        (
            '"svc.*".matches(destination.service)',
            None,
            8,
            "'.matches' (regular expressions) is not supported: use match() with a glob, "
            "startsWith or endsWith",
        ),
        (
            'conditional(true, "a")',
            None,
            0,
            "conditional() takes 3 arguments (condition, value if true, value if false), found 2",
        ),
        (
            'conditional(true, "a", 1)',
            None,
            0,
            "type error: conditional() needs both values of one type, found string and int",
        ),
        ('ip("not-an-ip")', None, 3, "ip(): 'not-an-ip' is not an IP address"),
        ("99999999999999999999", None, 0, "integer too large (limit is 2^63-1)"),
        ('"a" "b"', None, 4, "unexpected string '\"b\"' after a complete expression"),
        ("", None, 0, "empty expression"),
        ('"\\q"', None, 1, "unknown escape sequence '\\q' in string"),
        ("a ☃", None, 2, "unexpected character '☃'"),
    ],
)
def test_errors_say_what_and_where(text, expected, offset, message):
    error = error_of(text, expected)
    assert (error.offset, error.message) == (offset, message)


@pytest.mark.parametrize(
    ("text", "offset"),
    [
        ("(" * 1000 + "true" + ")" * 1000, MAX_DEPTH),
        ("!" * 1000 + "true", MAX_DEPTH),
        ("source.labels[" * 200 + '"a"' + "]" * 200, 14 * (MAX_DEPTH + 1) - 1),
        ('conditional(true, "a", ' * 100 + '"b"' + ")" * 100, 23 * MAX_DEPTH + 11),
    ],
)
def test_deep_nesting_is_a_clear_error(text, offset):
    error = error_of(text)
    assert (error.offset, error.message) == (
        offset,
        f"expression nested too deeply (limit is {MAX_DEPTH})",
    )


def test_long_operator_chains_are_a_clear_error():
    error = error_of(" || ".join(["true"] * 400))
    assert error.message == f"expression nested too deeply (limit is {MAX_DEPTH})"
    error = error_of(" || ".join(["(true || true)"] * 200))
    assert error.message in (
        f"expression nested too deeply (limit is {MAX_DEPTH})",
        "expression too large (limit is 512 terms)",
    )


def test_nesting_within_the_limit_compiles():
    depth = MAX_DEPTH - 2
    assert evaluate("(" * depth + "true" + ")" * depth) is True
    assert evaluate("!" * (depth - 1) + "true") is ((depth - 1) % 2 == 0)


def test_long_text_is_a_clear_error():
    error = error_of('"' + "a" * MAX_EXPRESSION_LENGTH + '"')
    assert error.message == (
        f"expression too long ({MAX_EXPRESSION_LENGTH + 2} characters, "
        f"limit is {MAX_EXPRESSION_LENGTH})"
    )


# --------------------------------------------------------------------------- hostile input

_FRAGMENTS = st.sampled_from(
    [
        "source.workload.name",
        "source.labels",
        "destination.port",
        "context.protocol",
        "(",
        ")",
        "[",
        "]",
        "!",
        "==",
        "!=",
        "&&",
        "||",
        "|",
        ",",
        ".",
        '"x"',
        "`y`",
        "0",
        "7",
        "true",
        "false",
        "conditional",
        "match",
        "startsWith",
        "ip",
        " ",
        '"',
        "\\",
        "☃",
        "connection.sent.bytes",
        ".endsWith(",
        "source",
        "nope.attr",
    ]
)


@settings(max_examples=400, deadline=None)
@given(st.text(max_size=200))
def test_random_text_gives_an_expression_error_or_an_expression(text):
    try:
        compiled = compile_expression(text, VOCABULARY)
    except ExpressionError as error:
        assert 0 <= error.offset <= len(text)
        assert error.message
    else:
        compiled.evaluate(AT_DESTINATION)
        compiled.evaluate(NOTHING_KNOWN)


@settings(max_examples=600, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=60).map("".join))
def test_random_token_soup_gives_an_expression_error_or_an_expression(text):
    try:
        compiled = compile_expression(text, VOCABULARY)
    except ExpressionError as error:
        assert 0 <= error.offset <= len(text)
    else:
        for attributes in (AT_DESTINATION, AT_SOURCE, NOTHING_KNOWN):
            value = compiled.evaluate(attributes)
            assert value is None or isinstance(value, str | int | bool)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=1, max_value=20_000), st.sampled_from(["(", "!", "[", "f("]))
def test_deep_prefixes_never_overflow_the_stack(depth, opener):
    with pytest.raises(ExpressionError):
        compile_expression(opener * depth, VOCABULARY)


@settings(max_examples=400, deadline=None)
@given(st.lists(_FRAGMENTS, max_size=40).map("".join))
def test_unparsed_tree_means_the_same(text):
    try:
        compiled = compile_expression(text, VOCABULARY)
    except ExpressionError:
        return
    again = compile_expression(unparse(compiled.tree), VOCABULARY)
    assert again.type is compiled.type
    for attributes in (AT_DESTINATION, AT_SOURCE, NOTHING_KNOWN):
        assert again.evaluate(attributes) == compiled.evaluate(attributes)


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ('a == "x" && (b || c)', 'a == "x" && (b || c)'),
        ("(a || b) && c", "(a || b) && c"),
        ("a || b && c", "a || b && c"),
        ('x | y | "z"', 'x | y | "z"'),
        (
            '(context.reporter.kind | "inbound") == "outbound"',
            '(context.reporter.kind | "inbound") == "outbound"',
        ),
        ('s["k"].startsWith("p\\"")', 'startsWith(s["k"], "p\\"")'),
        ("!(a == 1)", "!(a == 1)"),
    ],
)
def test_unparse_text(text, shown):
    assert unparse(parse_expression(text)) == shown

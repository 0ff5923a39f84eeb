"""Hostile and random configuration files give ConfigProblems, never another exception."""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.metrics import ConfigProblem, validate_files

FIXTURES = Path(__file__).parent.parent / "fixtures" / "metrics"


def validate_text(text: str) -> list[ConfigProblem]:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "random.yaml"
        path.write_text(text, encoding="utf-8", errors="surrogatepass")
        problems = validate_files([path])
    for problem in problems:
        assert isinstance(problem, ConfigProblem)
        assert problem.file == str(path)
        assert problem.message
    return problems


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=400))
def test_random_text_gives_only_problems(text):
    validate_text(text)


_SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False),
    st.text(max_size=30),
    st.sampled_from(
        [
            "connection.sent.bytes",
            "connection.received.bytes | 0",
            "connection.opened",
            'source.workload.name | "unknown"',
            'context.protocol == "tcp"',
            "((",
            "metric",
            "prometheus",
            "COUNTER",
            "x.instance.default",
            "mongohandler",
            "default",
            "",
            "source",
            "destination",
            "istio-system",
            "handler.prometheus",
            "a.b.c.d",
        ]
    ),
)
_KEYS = st.sampled_from(
    [
        "apiVersion",
        "kind",
        "metadata",
        "name",
        "namespace",
        "spec",
        "params",
        "value",
        "dimensions",
        "match",
        "actions",
        "handler",
        "instances",
        "metrics",
        "instance_name",
        "label_names",
        "compiledTemplate",
        "compiledAdapter",
        "builtins",
        "enabled",
        "removeLabels",
        "reporters",
        "help",
        "source_service",
        "__x",
        "bad-label",
    ]
)
_VALUES = st.recursive(
    _SCALARS,
    lambda children: st.one_of(
        st.lists(children, max_size=4), st.dictionaries(_KEYS, children, max_size=6)
    ),
    max_leaves=40,
)
_DOCUMENTS = st.one_of(
    st.dictionaries(_KEYS, _VALUES, max_size=6),
    st.fixed_dictionaries(
        {
            "apiVersion": st.just("config.istio.io/v1alpha2"),
            "kind": st.sampled_from(
                ["instance", "metric", "handler", "prometheus", "rule", "logentry"]
            ),
            "metadata": st.fixed_dictionaries({"name": _SCALARS, "namespace": _SCALARS}),
            "spec": _VALUES,
        }
    ),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_DOCUMENTS, min_size=1, max_size=4))
def test_random_documents_give_only_problems(documents):
    validate_text(yaml.safe_dump_all(documents))


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(min_value=0, max_value=3000), st.integers(min_value=0, max_value=5000))
def test_mangled_bookinfo_gives_only_problems(cut, insert_at):
    text = (FIXTURES / "tcp-metrics.yaml").read_text()
    mangled = text[:cut] + "((\n" + text[cut:]
    validate_text(mangled[:insert_at] + mangled[insert_at + 7 :])


def test_deep_yaml_nesting_is_a_problem():
    for text in (
        "[" * 100000,
        "[" * 900 + "]" * 900,
        "".join(f"{' ' * i}a:\n" for i in range(2000)) + " " * 2000 + "b\n",
    ):
        [problem] = validate_text(text)
        assert "nested too deeply" in problem.message or "not YAML" in problem.message


def test_expression_too_long_is_a_problem():
    text = (
        "metrics:\n- name: m\n  value: connection.sent.bytes\n  match: "
        + ("true && " * 2000)
        + "true\n"
    )
    [problem] = validate_text(text)
    assert problem.message == "match: expression too long (16004 characters, limit is 4096)"
    assert (problem.line, problem.column) == (4, 10)

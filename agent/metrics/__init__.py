"""Metric definitions: the built-in Istio TCP set plus user configuration.

Two formats, in the same files if wanted: tcpacct's native YAML and Istio Mixer's
``config.istio.io/v1alpha2`` objects (instance/handler/rule, metric/prometheus/rule).
See docs/metrics-config.md. Public API::

    load_catalogue(paths) -> Catalogue          (raises ConfigError)
    validate_files(paths) -> list[ConfigProblem]
    render(catalogue) -> str                    (YAML for `config show`)
    ConfigWatcher(paths, on_change, interval)   (file / ConfigMap change detection)
"""

from .catalogue import Catalogue, builtin_metrics, load_catalogue, render, validate_files
from .definitions import CompiledMetric
from .problems import ConfigError, ConfigProblem
from .reloading import ConfigWatcher

__all__ = [
    "Catalogue",
    "CompiledMetric",
    "ConfigError",
    "ConfigProblem",
    "ConfigWatcher",
    "builtin_metrics",
    "load_catalogue",
    "render",
    "validate_files",
]

"""An API client from in-cluster config (a pod's service account) or a kubeconfig file."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes import client

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"


def in_cluster_available(
    environ: Mapping[str, str] = os.environ,
    service_account_dir: str = SERVICE_ACCOUNT_DIR,
) -> bool:
    """Whether this process runs in a pod that can reach the API (env vars and token present)."""
    return (
        bool(environ.get("KUBERNETES_SERVICE_HOST"))
        and bool(environ.get("KUBERNETES_SERVICE_PORT"))
        and (Path(service_account_dir) / "token").is_file()
    )


def api_client(kubeconfig: str | None = None, *, context: str | None = None) -> client.ApiClient:
    """A client for the kubeconfig at ``kubeconfig``, else for the in-cluster service account.

    Connection retries are left to the watch loop (with its own backoff), so urllib3 does not
    retry on its own. The kubernetes package is imported here, not with this module: an
    agent in local mode never pays for it (a fifth of a second at start).
    """
    from kubernetes import client, config

    configuration = client.Configuration()
    if kubeconfig:
        config.load_kube_config(
            config_file=kubeconfig, context=context, client_configuration=configuration
        )
    else:
        config.load_incluster_config(client_configuration=configuration)
    configuration.retries = False
    return client.ApiClient(configuration)

"""Kubernetes metadata: the only package that imports the official ``kubernetes`` client.

``records`` decodes API objects into small records (only the fields tcpacct uses);
``identity`` applies Istio's naming rules to them; ``watching`` runs one list+watch loop per
resource kind; ``cache`` holds the records and answers lookups (pod by IP/UID, Service by
ClusterIP or endpoint); ``client`` builds an API client from in-cluster config or a kubeconfig.
"""

from __future__ import annotations

from agent.lazy_exports import lazy_exports

# Names re-exported lazily (PEP 562): importing agent.k8s.client alone, as local mode does,
# must not import the kubernetes package through agent.k8s.cache.
_HOMES = {
    "CacheStats": "agent.k8s.cache",
    "KubernetesCache": "agent.k8s.cache",
    "api_client": "agent.k8s.client",
    "in_cluster_available": "agent.k8s.client",
}

__getattr__ = lazy_exports(__name__, _HOMES)


__all__ = ["CacheStats", "KubernetesCache", "api_client", "in_cluster_available"]

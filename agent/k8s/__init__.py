"""Kubernetes metadata: the only package that imports the official ``kubernetes`` client.

``records`` decodes API objects into small records (only the fields tcpacct uses);
``identity`` applies Istio's naming rules to them; ``watching`` runs one list+watch loop per
resource kind; ``cache`` holds the records and answers lookups (pod by IP/UID, Service by
ClusterIP or endpoint); ``client`` builds an API client from in-cluster config or a kubeconfig.
"""

from agent.k8s.cache import CacheStats, KubernetesCache
from agent.k8s.client import api_client, in_cluster_available

__all__ = ["CacheStats", "KubernetesCache", "api_client", "in_cluster_available"]

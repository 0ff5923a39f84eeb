"""Enrichment: a socket sample -> the identities on both ends of its connection.

``local`` serves local mode (processes and addresses); ``kubernetes`` serves cluster mode
(pods, workloads, services). Both implement :class:`agent.model.Enricher`.
"""

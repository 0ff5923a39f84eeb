"""Programs the e2e tests run inside the "pods" (network namespaces): stdlib only."""

"""Kubernetes helpers: offline validation of the manifests and of generated objects."""

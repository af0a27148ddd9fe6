"""Volumes: attributes, selectors, the registry and the per-volume task."""

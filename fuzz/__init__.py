"""Fuzz targets for the parts of the driver that read untrusted bytes (see CONTRIBUTING.md)."""

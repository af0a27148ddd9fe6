"""The CSI Identity and Node services: request validation and translation only."""

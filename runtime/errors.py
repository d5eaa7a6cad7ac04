"""Errors the runtime reports to users (one line each)."""


class ModelError(ValueError):
    """A model file that cannot be used: missing, unreadable, no contract, or its provider failed to start."""

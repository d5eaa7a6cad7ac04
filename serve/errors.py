"""Every error the server's scheduler reports to the HTTP layer, which turns each into its status (serve/app.py's
``ERRORS`` table); each message is one line."""

from __future__ import annotations


class QueueFull(RuntimeError):
    """More images waiting than ``queue_limit``: the caller should retry later (HTTP 429 with Retry-After)."""


class Cancelled(RuntimeError):
    """The request was cancelled (client gone, deadline passed, or the server stopping) before it finished."""

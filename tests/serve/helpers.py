"""Helpers of the service's tests: decoding responses, comparing images, waiting."""

from __future__ import annotations

import base64
import io
import time
import warnings

import numpy as np
from PIL import Image

from runtime.tolerances import TOLERANCES

LEVELS = TOLERANCES["fp32-same-math"].max_levels
CLASS_NAMES = ["alpha", "beta", "gamma"]  # the classes of the conditional test model
SERVE_MODULES = ("fastapi", "uvicorn", "prometheus_client", "httpx")  # the serve extra, and httpx for the clients


def client_class():
    """FastAPI's TestClient class (starlette now asks for httpx2 instead of httpx; the dev extra installs httpx)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from fastapi.testclient import TestClient
    return TestClient


def decode(response_json: dict) -> np.ndarray:
    """The PNGs of a response as (n, H, W, C) uint8."""
    images = [np.asarray(Image.open(io.BytesIO(base64.b64decode(r["png_base64"])))) for r in response_json["images"]]
    return np.stack([im[:, :, None] if im.ndim == 2 else im for im in images])


def assert_images_close(got: np.ndarray, want: np.ndarray, levels: int = LEVELS) -> None:
    """At most ``levels`` 8-bit levels apart; a failure names the largest difference and where."""
    assert got.shape == want.shape and got.dtype == want.dtype == np.uint8, (got.shape, got.dtype, want.shape)
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    where = np.unravel_index(int(diff.argmax()), diff.shape)
    assert diff.max() <= levels, (f"served images differ from offline ones by {diff.max()} levels (allowed {levels}) "
                                  f"at (image, row, col, channel) {where}: {got[where]} vs {want[where]}")


def wait_until(condition, timeout: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < end, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.005)


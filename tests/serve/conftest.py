"""Fixtures of the service's tests: toy models (torch-free) and an app over a real ``Scheduler``, in process.

The tests need the ``serve`` extra (fastapi, uvicorn, prometheus-client) and httpx; without them each test module
is skipped with the reason (``pytest.importorskip``), never an import error.
"""

from __future__ import annotations

from contextlib import ExitStack
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import runtime
from ddpm_export.run_defaults import set_run_defaults
from runtime.metadata import RunDefaults
from tests.serve.helpers import CLASS_NAMES, client_class
from tests.toy_onnx import make_toy_predictor


@pytest.fixture(scope="session")
def long_cond_onnx(tmp_path_factory) -> Path:
    """Class-conditional toy predictor, 3 named classes, 3×16×16, T = 1000; it recommends DDIM-20 at w = 1.5."""
    path = make_toy_predictor(tmp_path_factory.mktemp("serve") / "cond.onnx", channels=3, image_size=16,
                              num_classes=3, timesteps=1000, class_names=CLASS_NAMES)
    set_run_defaults(path, RunDefaults(sampler="ddim", steps=20, guidance=1.5))
    return path


@pytest.fixture(scope="session")
def nan_onnx(tmp_path_factory) -> Path:
    """Like ``long_cond_onnx`` (without recommendations), but class 2's embedding is NaN: its images come out NaN."""
    path = make_toy_predictor(tmp_path_factory.mktemp("serve") / "nan.onnx", channels=3, image_size=16,
                              num_classes=3, timesteps=1000)
    model = onnx.load(str(path))
    for k, init in enumerate(model.graph.initializer):
        if init.name == "emb_y":
            table = numpy_helper.to_array(init).copy()
            table[2] = np.nan
            model.graph.initializer[k].CopyFrom(numpy_helper.from_array(table, "emb_y"))
    onnx.save_model(model, str(path))
    return path


@pytest.fixture
def serving():
    """``serving(model, **options) -> (client, scheduler, app)``: a started app (lifespan run) over a real scheduler;
    options are ``create_app``'s (api_key, max_images, max_body_bytes, deadline_s) and ``Scheduler``'s."""
    from serve.app import MAX_BODY_BYTES, create_app
    from serve.scheduler import Scheduler

    with ExitStack() as stack:
        def start(model, *, api_key=None, max_images=64, max_body_bytes=MAX_BODY_BYTES, deadline_s=60.0, **options):
            pipeline = runtime.load(model, "cpu", threads=1, log=lambda m: None)
            scheduler = Scheduler(pipeline, **options)
            app = create_app(scheduler, pipeline, api_key=api_key, max_images=max_images,
                             max_body_bytes=max_body_bytes, deadline_s=deadline_s, grace_s=5.0)
            return stack.enter_context(client_class()(app)), scheduler, app

        yield start


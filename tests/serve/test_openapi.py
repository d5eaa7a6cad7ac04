"""/openapi.json is the truth: a schema-driven fuzzer (schemathesis) sends valid and invalid requests to every
operation, and every status, media type, header and body the server answers must be the ones the document gives."""

from __future__ import annotations

import pytest

from tests.serve.helpers import CLASS_NAMES, SERVE_MODULES

for _module in (*SERVE_MODULES, "schemathesis"):
    pytest.importorskip(_module, reason="needs the serve and dev extras: pip install -e '.[serve,dev]'")

import schemathesis  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi import checks  # noqa: E402

import runtime  # noqa: E402
from serve.app import create_app  # noqa: E402
from serve.scheduler import Scheduler  # noqa: E402
from tests.toy_onnx import make_toy_predictor  # noqa: E402

KEY = "fuzz-key"
CHECKS = [checks.status_code_conformance, checks.content_type_conformance, checks.response_schema_conformance,
          checks.response_headers_conformance, checks.negative_data_rejection]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    """The app over a small fast model (T = 50, 8×8, three named classes), with an API key; schemathesis runs its
    lifespan (the scheduler) once."""
    path = make_toy_predictor(tmp_path_factory.mktemp("openapi") / "toy.onnx", channels=1, image_size=8,
                              num_classes=3, timesteps=50, class_names=CLASS_NAMES)
    pipeline = runtime.load(path, "cpu", threads=1, log=lambda m: None)
    app = create_app(Scheduler(pipeline, max_batch=8), pipeline, api_key=KEY, max_images=4, deadline_s=30)
    schema = schemathesis.openapi.from_asgi("/openapi.json", app, headers={"X-API-Key": KEY})
    schema.config.generation.update(modes=[GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
    return schema


OPERATIONS = ["POST /v1/images", "GET /v1/model", "GET /healthz", "GET /metrics"]


def test_the_document_lists_every_operation(api):
    assert sorted(op.ok().label for op in api.get_all_operations()) == sorted(OPERATIONS)


@pytest.mark.parametrize("label, mode", [*((label, GenerationMode.POSITIVE) for label in OPERATIONS),
                                         ("POST /v1/images", GenerationMode.NEGATIVE)])  # the one with inputs
def test_every_answer_is_one_the_document_gives(api, label, mode):
    """Valid requests (positive) and requests that break the schema (negative; they must be refused with a
    documented 4xx), each sent with the key and without it (401 wherever the key is needed, as documented)."""
    operation = api.find_operation_by_label(label)

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True,
              database=None)
    def fuzz(case) -> None:
        case.call_and_validate(headers={"X-API-Key": KEY}, checks=CHECKS)
        case.call_and_validate(checks=CHECKS[:4])

    fuzz()

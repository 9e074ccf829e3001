"""Schema fuzzing of the service with schemathesis: whatever a client sends, no 5xx answer.

The cases come from schemathesis's Hypothesis strategies (`APIOperation.as_strategy`), driven by plain
`hypothesis.given`: schemathesis's pytest plugin (`from_fixture`/`parametrize`) rewrites pytest's private
node ids and broke with pytest 9.2 (AttributeError: 'Function' object has no attribute '_nodeid'), so
this test stays off pytest internals and runs with the newest releases as well as with the lock file's.
"""
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="schema fuzzing needs schemathesis (the test extra)")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from PIL import Image  # noqa: E402

import clipzsl  # noqa: E402
from clipzsl.serve import Limits, create_app  # noqa: E402

#: the service's routes that take input (the page, /health and the docs take none)
FUZZED = {"POST /search", "POST /classify", "POST /explain", "GET /images/{image_id}"}


@pytest.fixture(scope="module")
def operations(tiny_clip, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "photos").mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (32, 32), colour).save(root / "photos" / f"{i}.png")
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    clipzsl.ImageIndex(root / "index", model).update(root / "photos", progress=False)
    app = create_app(model, {"photos": root / "index"}, {"rgb": clipzsl.load_labels(["red", "green", "blue"])},
                     cache=root / "cache", limits=Limits(max_labels=20, batch_window_s=0.0))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    found = (result.ok() for result in schema.get_all_operations())
    return {f"{op.method.upper()} {op.path}": op for op in found}


def test_the_schema_lists_every_fuzzed_route(operations):
    assert FUZZED <= set(operations), sorted(operations)


@pytest.mark.parametrize("route", sorted(FUZZED))
def test_no_request_gets_a_server_error(operations, route):
    @given(case=operations[route].as_strategy())
    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    def no_server_error(case) -> None:
        response = case.call()
        assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

    no_server_error()

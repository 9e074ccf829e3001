"""Schema fuzzing of the service with schemathesis: whatever a client sends, no 5xx answer."""
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
schemathesis = pytest.importorskip("schemathesis", reason="schema fuzzing needs schemathesis (the test extra)")
from hypothesis import HealthCheck, settings  # noqa: E402
from PIL import Image  # noqa: E402

import clipzsl  # noqa: E402
from clipzsl.serve import Limits, create_app  # noqa: E402


@pytest.fixture(scope="module")
def api_schema(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "photos").mkdir()
    for i, colour in enumerate([(200, 0, 0), (0, 200, 0), (0, 0, 200)]):
        Image.new("RGB", (32, 32), colour).save(root / "photos" / f"{i}.png")
    model = clipzsl.load_model(f"hf:{tiny_clip}")
    clipzsl.ImageIndex(root / "index", model).update(root / "photos", progress=False)
    app = create_app(model, {"photos": root / "index"}, {"rgb": clipzsl.load_labels(["red", "green", "blue"])},
                     cache=root / "cache", limits=Limits(max_labels=20, batch_window_s=0.0))
    return schemathesis.openapi.from_asgi("/openapi.json", app)


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_request_gets_a_server_error(case):
    response = case.call()
    assert response.status_code < 500, (case.method, case.path, case.body, response.text[:300])

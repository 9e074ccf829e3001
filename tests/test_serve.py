"""The HTTP service (`clipzsl serve`) through FastAPI's test client: every endpoint, every refusal.

A tiny random HF CLIP keeps it fast; what is checked is what the service adds (routing, ids,
batching, the label-set LRU, limits, safety), against the library's own answers.
"""
from __future__ import annotations

import asyncio
import io
import os

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402

import clipzsl  # noqa: E402
from clipzsl.serve import Limits, create_app  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220), "yellow": (230, 220, 30)}


def png_bytes(colour=(200, 30, 30), size=(40, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


@pytest.fixture(scope="module")
def model(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


@pytest.fixture(scope="module")
def collection(tmp_path_factory, model):
    """A folder of four images, a secret file beside it, and its index."""
    root = tmp_path_factory.mktemp("serve")
    photos = root / "photos"
    photos.mkdir()
    for name, colour in COLOURS.items():
        Image.new("RGB", (48, 40), colour).save(photos / f"{name}.png")
    index = clipzsl.ImageIndex(root / "index", model)
    index.update(photos, progress=False)
    return root, index


@pytest.fixture()
def client(model, collection, tmp_path):
    _, index = collection
    app = create_app(model, {"photos": index.directory}, {"colours": clipzsl.load_labels(list(COLOURS))},
                     cache=tmp_path / "cache", limits=Limits(max_upload_bytes=200_000, max_labels=10))
    with TestClient(app) as c:
        yield c


def test_health_lists_what_is_loaded(client, model):
    body = client.get("/health").json()
    assert body["status"] == "ok" and body["model"] == model.spec
    assert body["indexes"] == {"photos": 4} and body["label_sets"] == ["colours"] and body["adapter"] is False


def test_search_by_text_matches_the_index(client, collection):
    _, index = collection
    body = client.post("/search", json={"text": "a red square", "top_k": 3}).json()
    expected = index.search("a red square", top_k=3)
    assert [(r["path"], pytest.approx(r["score"], abs=1e-5)) for r in body["results"]] == \
        [(p, pytest.approx(s, abs=1e-5)) for p, s in expected]
    keys = index.paths()
    assert all(keys[r["id"]] == r["path"] for r in body["results"])


def test_search_by_image_finds_that_image_first(client, collection):
    root, _ = collection
    data = (root / "photos" / "blue.png").read_bytes()
    response = client.post("/search", files={"image": ("q.png", data, "image/png")}, data={"top_k": "2"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["results"][0]["path"] == str(root / "photos" / "blue.png")
    assert body["results"][0]["score"] == pytest.approx(1.0, abs=1e-4)


def test_thumbnail_by_id_is_a_small_jpeg(client, collection):
    _, index = collection
    response = client.get("/images/0", params={"size": 32})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == 32
    original = Image.open(index.paths()[0]).convert("RGB")
    assert np.abs(np.asarray(thumb.resize((4, 4)), float) - np.asarray(original.resize((4, 4)), float)).mean() < 12


def test_classify_matches_the_library(client, model, tmp_path):
    data = png_bytes(COLOURS["green"])
    response = client.post("/classify", files={"image": ("g.png", data, "image/png")},
                           data={"labels": "red,green,blue", "top_k": "2"})
    assert response.status_code == 200, response.text
    got = [(p["label"], p["probability"]) for p in response.json()["predictions"]]
    clf = clipzsl.ZeroShotClassifier(model, labels=["red", "green", "blue"], cache=False)
    expected = clf.predict(Image.open(io.BytesIO(data)), top_k=2)[0]
    assert [l for l, _ in got] == [l for l, _ in expected]
    assert [p for _, p in got] == pytest.approx([p for _, p in expected], abs=1e-5)


def test_uploads_are_decoded_in_memory_not_through_a_temporary_file(client, monkeypatch, tmp_path):
    """With the temporary directory unusable (as on a full disk), uploads are still classified and
    searched with: nothing of an upload is written to disk."""
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    files = {"image": ("g.png", png_bytes(COLOURS["green"]), "image/png")}
    assert client.post("/classify", files=files, data={"labels": "red,green,blue"}).status_code == 200
    assert client.post("/search", files=files, data={"top_k": "2"}).status_code == 200
    response = client.post("/classify", files={"image": ("e.png", b"", "image/png")}, data={"labels": "a,b"})
    assert response.status_code == 422 and "empty file" in response.json()["detail"]


def test_classify_by_label_set_name_and_template_set(client):
    files = {"image": ("r.png", png_bytes(), "image/png")}
    loaded = client.post("/classify", files=files, data={"labels": "colours", "top_k": "4"}).json()
    assert sorted(p["label"] for p in loaded["predictions"]) == sorted(COLOURS)
    shipped = client.post("/classify", files=files, data={"labels": "cifar10", "templates": "bare", "top_k": "3"})
    assert shipped.status_code == 200 and len(shipped.json()["predictions"]) == 3


def test_label_sets_are_cached_across_requests(client):
    service = client.app.state.service
    files = {"image": ("r.png", png_bytes(), "image/png")}
    for _ in range(3):
        assert client.post("/classify", files=files, data={"labels": "cat,dog"}).status_code == 200
    assert len(service.classifiers) == 1
    first = next(iter(service.classifiers.values()))
    client.post("/classify", files=files, data={"labels": "cat,dog,fish"})
    assert len(service.classifiers) == 2 and first in service.classifiers.values()


def test_concurrent_requests_share_a_forward_pass(model, collection, tmp_path):
    """Twelve requests sent at once: fewer batches than requests, and each gets its own answer."""
    import httpx

    _, index = collection
    app = create_app(model, {"photos": index.directory}, cache=tmp_path, limits=Limits(batch_window_s=0.2))

    async def burst():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport,
                                                                       base_url="http://127.0.0.1") as c:
            await c.post("/classify", files={"image": ("x.png", png_bytes(), "image/png")}, data={"labels": "a,b"})
            before = len(app.state.service.batcher.batches)
            calls = [c.post("/classify", files={"image": (f"{n}.png", png_bytes(colour), "image/png")},
                            data={"labels": "red,green,blue,yellow"}) for n, colour in COLOURS.items()]
            calls += [c.post("/search", json={"text": f"query {i}", "top_k": 2}) for i in range(8)]
            answers = await asyncio.gather(*calls)
            return answers, app.state.service.batcher.batches[before:]

    answers, batches = asyncio.run(burst())
    assert all(a.status_code == 200 for a in answers)
    assert sum(batches) == 12 and len(batches) < 12
    clf = clipzsl.ZeroShotClassifier(model, labels=list(COLOURS), cache=False)
    for a, colour in zip(answers[:4], COLOURS.values()):
        expected = clf.predict(Image.new("RGB", (40, 30), colour), top_k=1)[0][0][0]
        assert a.json()["predictions"][0]["label"] == expected
    for i, a in enumerate(answers[4:]):
        assert [r["path"] for r in a.json()["results"]] == [p for p, _ in index.search(f"query {i}", 2)]


def test_explain_without_an_adapter_draws_the_models_default_method(client, model):
    from clipzsl.maps import default_method, methods_for

    assert client.get("/health").json()["map_methods"] == methods_for(model)
    image = ("r.png", png_bytes(size=(64, 48)), "image/png")
    response = client.post("/explain", files={"image": image}, data={"labels": "red,green", "label": "green"})
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    heat = Image.open(io.BytesIO(response.content))
    assert heat.width > 64 and heat.height > 48  # the image, the scale beside it, the caption below
    body = client.post("/explain", files={"image": image},
                       data={"labels": "red,green", "label": "green", "format": "json"}).json()
    clf = clipzsl.ZeroShotClassifier(model, labels=["red", "green"], cache=False)
    expected, = clf.heatmaps([Image.open(io.BytesIO(image[1]))])
    assert (body["label"], body["method"], body["width"], body["height"]) == ("green", default_method(model), 64, 48)
    assert body["box"] == list(expected.box)
    np.testing.assert_allclose(body["grid"], expected.grid[1], atol=1e-5)
    assert body["probability"] == pytest.approx(clf.predict_proba(image_of(image))[0, 1], abs=1e-5)
    left, top, right, bottom = body["peak_box"]
    assert 0 <= left < right <= 64 and 0 <= top < bottom <= 48
    assert body["peak_score"] == pytest.approx(float(expected.grid[1].max()), abs=1e-5)


def image_of(upload) -> Image.Image:
    return Image.open(io.BytesIO(upload[1])).convert("RGB")


@pytest.mark.parametrize("method", ["nope", "adapter"])
def test_explain_refuses_a_method_the_model_has_not_naming_the_choices(client, model, method):
    from clipzsl.maps import methods_for

    response = client.post("/explain", files={"image": ("r.png", png_bytes(), "image/png")},
                           data={"labels": "a,b", "method": method})
    assert response.status_code == 422
    assert response.json()["detail"] == f"method {method!r}: pick one of {', '.join(methods_for(model))}"
    response = client.post("/explain", files={"image": ("r.png", png_bytes(), "image/png")},
                           data={"labels": "a,b", "format": "gif"})
    assert response.status_code == 422


def test_explain_with_an_adapter_draws_its_attention(model, tmp_path):
    adapter = clipzsl.CrossAttentionAdapter(model.embed_dim, heads=4)
    with TestClient(create_app(model, adapter=adapter, cache=tmp_path)) as c:
        response = c.post("/explain", files={"image": ("r.png", png_bytes(size=(64, 48)), "image/png")},
                          data={"labels": "red,green", "label": "green"})
        assert c.get("/health").json()["adapter"] is True
        assert c.get("/health").json()["map_methods"][0] == "adapter"
        data = c.post("/explain", files={"image": ("r.png", png_bytes(size=(64, 48)), "image/png")},
                      data={"labels": "red,green", "format": "json"}).json()
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    heat = Image.open(io.BytesIO(response.content))
    assert heat.width > 64 and heat.height > 48  # the image, the scale beside it, the caption below
    assert data["method"] == "adapter"


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="query"' in page.text and 'id="drop"' in page.text
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/health", "/search", "/classify", "/explain", "/images/{image_id}"} <= set(paths)
    assert client.get("/docs").status_code == 200


# -- refusals ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [
    "/images/../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/images/..%2F..%2Fetc%2Fpasswd",
    "/images//etc/passwd", "/images/%2Fetc%2Fpasswd", "/images/-1", "/images/4", "/images/99999999999999999999",
    "/images/0?index=..%2F..",
])
def test_images_serves_only_indexed_files_by_id(client, path):
    response = client.get(path)
    assert response.status_code in (404, 422), (path, response.status_code)
    assert b"root:" not in response.content


def test_images_refuses_a_symlink_out_of_the_collection(model, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (20, 20), (1, 2, 3)).save(photos / "inside.png")
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(secret)
    os.symlink(secret, photos / "link.png")
    index = clipzsl.ImageIndex(tmp_path / "index", model)
    index.update(photos, progress=False)
    keys = index.paths()
    with TestClient(create_app(model, {"p": index.directory}, cache=False)) as c:
        link, inside = keys.index(str(photos / "link.png")), keys.index(str(photos / "inside.png"))
        refused = c.get(f"/images/{link}")
        assert refused.status_code == 404 and "links out of the folder" in refused.json()["detail"]
        assert c.get(f"/images/{inside}").status_code == 200
        os.remove(photos / "inside.png")  # an indexed file swapped for a link to the secret after indexing
        os.symlink(secret, photos / "inside.png")
        assert c.get(f"/images/{inside}").status_code == 404


def test_upload_over_the_cap_is_413(client):
    big = b"\0" * 300_000
    response = client.post("/classify", files={"image": ("big.png", big, "image/png")}, data={"labels": "a,b"})
    assert response.status_code == 413 and "upload limit" in response.json()["detail"]
    streamed = client.post("/search", content=iter([b"x" * 100_000] * 3), headers={"content-type": "application/json"})
    assert streamed.status_code == 413


def test_serve_listens_on_loopback_by_default():
    from clipzsl.cli import build_parser

    assert build_parser().parse_args(["serve"]).host == "127.0.0.1"


def test_default_upload_cap_is_20_mb():
    assert Limits().max_upload_bytes == 20 * 2**20


@pytest.mark.parametrize("data, reason", [
    (b"this is not an image", "not an image"),
    (png_bytes()[:60], "corrupt or truncated"),
    (b"", "empty file"),
])
def test_non_images_are_422_with_the_reason(client, data, reason):
    response = client.post("/classify", files={"image": ("x.png", data, "image/png")}, data={"labels": "a,b"})
    assert response.status_code == 422 and reason in response.json()["detail"]
    assert "x.png" in response.json()["detail"]


def test_decompression_bomb_is_422(client):
    out = io.BytesIO()
    Image.new("1", (12_000, 12_000)).save(out, "PNG")  # 144 M pixels, a few kB
    response = client.post("/classify", files={"image": ("bomb.png", out.getvalue(), "image/png")},
                           data={"labels": "a,b"})
    assert response.status_code == 422 and "decompression bomb" in response.json()["detail"]


def test_too_many_labels_is_422(client):
    labels = ",".join(f"label{i}" for i in range(11))
    response = client.post("/classify", files={"image": ("r.png", png_bytes(), "image/png")}, data={"labels": labels})
    assert response.status_code == 422 and "11 labels" in response.json()["detail"]


@pytest.mark.parametrize("labels", ["no_such_set", "/etc/passwd", "../prompts/labels/cifar10.txt", "colours.txt"])
def test_unknown_label_set_is_404_and_no_path_is_opened(client, labels):
    response = client.post("/classify", files={"image": ("r.png", png_bytes(), "image/png")}, data={"labels": labels})
    assert response.status_code == 404 and "unknown label set" in response.json()["detail"]


def test_unknown_index_and_template_set_are_404(client):
    assert client.post("/search", json={"text": "x", "index": "nope"}).status_code == 404
    assert client.get("/images/0", params={"index": "nope"}).status_code == 404
    response = client.post("/classify", files={"image": ("r.png", png_bytes(), "image/png")},
                           data={"labels": "a,b", "templates": "/etc/passwd"})
    assert response.status_code == 404 and "unknown template set" in response.json()["detail"]


def test_no_index_loaded_is_404(model):
    with TestClient(create_app(model, cache=False)) as c:
        response = c.post("/search", json={"text": "x"})
    assert response.status_code == 404 and "--index" in response.json()["detail"]


@pytest.mark.parametrize("body", [{"text": ""}, {"text": "x", "top_k": 0}, {"text": "x", "top_k": 10_000},
                                  {"top_k": 3}, {"text": "x" * 5000}])
def test_bad_search_queries_are_422(client, body):
    assert client.post("/search", json=body).status_code == 422


def test_bad_classify_inputs_are_4xx(client):
    files = {"image": ("r.png", png_bytes(), "image/png")}
    assert client.post("/classify", files=files, data={"labels": "a,b", "top_k": "0"}).status_code == 422
    assert client.post("/classify", files=files, data={"labels": ",,"}).status_code == 422
    assert client.post("/classify", files=files, data={"labels": "cat,"}).status_code == 422  # softmax of one label
    assert client.post("/classify", data={"labels": "a,b"}).status_code == 422
    assert client.post("/search", content=b"text", headers={"content-type": "text/plain"}).status_code == 415
    assert client.post("/search", content=b"{not json", headers={"content-type": "application/json"}).status_code == 422
    # the service still answers after all of that
    assert client.post("/classify", files=files, data={"labels": "a,b"}).status_code == 200


def test_an_app_stopped_and_started_again_still_answers(model, collection, tmp_path):
    """Each start of the app (a lifespan) gets a model thread of its own: the second start once answered
    every search with a 500 (the first stop had shut the only one down)."""
    _, index = collection
    app = create_app(model, {"photos": index.directory}, cache=tmp_path / "cache")
    for _ in range(2):
        with TestClient(app) as c:
            response = c.post("/search", json={"text": "a red square", "top_k": 2})
            assert response.status_code == 200, response.text
            assert len(response.json()["results"]) == 2


def test_app_from_folders_names_indexes_by_folder_and_loads_their_model(collection, tmp_path, monkeypatch):
    from clipzsl import serve
    from clipzsl.errors import InputError

    _, index = collection
    loaded: list[str] = []
    monkeypatch.setattr(serve, "load_model", lambda spec, **options: loaded.append(spec) or index.model)
    twin = tmp_path / "elsewhere" / index.directory.name
    with pytest.raises(InputError, match="share a name"):
        serve.app_from_folders([index.directory, twin])
    assert loaded == []  # refused before any model is loaded
    app = serve.app_from_folders([index.directory], {"two": ["cat", "dog"]}, cache=False)
    assert loaded == [index.model.spec]  # the model the index was built with
    with TestClient(app) as c:
        body = c.get("/health").json()
    assert body["indexes"] == {index.directory.name: 4} and body["label_sets"] == ["two"]


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_run_service_warns_of_a_public_host(host, warned, monkeypatch, caplog):
    from clipzsl import serve

    ran = []
    monkeypatch.setattr(serve.uvicorn, "run", lambda app, **options: ran.append(options))
    with caplog.at_level("WARNING", logger="clipzsl"):
        serve.run_service("app", host, 8123)
    assert ran == [{"host": host, "port": 8123, "log_level": "warning"}]
    assert ("anyone who can reach this machine" in caplog.text) == warned

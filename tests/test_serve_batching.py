"""Micro-batching in the service: a batch of searches is one store search, uploads reach the model
prepared, and nothing of a request stays behind once it is answered."""
from __future__ import annotations

import asyncio
import gc
import weakref
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
httpx = pytest.importorskip("httpx", reason="the tests drive the app through httpx")
import test_serve  # noqa: E402
from test_serve import COLOURS, png_bytes  # noqa: E402

from clipzsl.serve import Limits, create_app  # noqa: E402
from clipzsl.saved_index import SavedIndex  # noqa: E402

model, collection = test_serve.model, test_serve.collection  # the fixtures of the service's tests


async def _burst(app, requests):
    """Every request sent at once (after one warm-up): the answers and the sizes of the batches run."""
    transport = httpx.ASGITransport(app=app)
    async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport,
                                                                   base_url="http://127.0.0.1") as c:
        await c.post("/search", json={"text": "warm-up", "top_k": 1})
        before = len(app.state.service.batcher.batches)
        answers = await asyncio.gather(*(c.post("/search", **request) for request in requests))
        return answers, app.state.service.batcher.batches[before:]


def test_a_batch_of_text_and_image_searches_is_one_store_search(model, collection, tmp_path, monkeypatch):
    root, index = collection
    photos = sorted((root / "photos").glob("*.png"))
    texts = [("a red square", 1), ("green", 4), ("something blue", 2), ("yellow paint", 3)]
    requests = [{"json": {"text": text, "top_k": k}} for text, k in texts]
    requests += [{"files": {"image": (p.name, p.read_bytes(), "image/png")}, "data": {"top_k": str(k)}}
                 for p, k in zip(photos, (2, 4, 1))]
    searched: list[int] = []
    store_search = SavedIndex.search

    def counted(self, queries, top_k, allowed=None):
        searched.append(len(queries))
        return store_search(self, queries, top_k, allowed)

    monkeypatch.setattr(SavedIndex, "search", counted)
    app = create_app(model, {"photos": index.directory}, cache=tmp_path, limits=Limits(batch_window_s=0.5))
    answers, batches = asyncio.run(_burst(app, requests))
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert sum(batches) == len(requests) and len(batches) < len(requests)
    assert searched[1:] == batches  # after the warm-up's: one store search per batch, all of its queries

    monkeypatch.setattr(SavedIndex, "search", store_search)
    expected = [index.search(text, top_k=k) for text, k in texts]
    expected += [index.search(Path(p), top_k=k) for p, k in zip(photos, (2, 4, 1))]
    keys = index.paths()
    for answer, hits in zip(answers, expected):
        results = answer.json()["results"]
        assert [(r["id"], r["path"]) for r in results] == [(keys.index(path), path) for path, _ in hits]
        np.testing.assert_allclose([r["score"] for r in results], [score for _, score in hits], atol=1e-5)


def test_nothing_of_an_answered_request_stays_in_the_service(model, tmp_path, monkeypatch):
    """Once answered, a request's upload is gone, decoded or prepared for the model (the batcher
    kept the last batch's jobs while it waited for the next request)."""
    from fastapi.testclient import TestClient

    from clipzsl import serve

    made: list[weakref.ref] = []

    def tracked(function):
        def wrapper(*args):
            out = function(*args)
            made.append(weakref.ref(out))
            return out
        return wrapper

    app = create_app(model, cache=tmp_path)
    monkeypatch.setattr(serve, "decode_image", tracked(serve.decode_image))
    monkeypatch.setattr(model, "pixels_uint8", tracked(model.pixels_uint8))
    with TestClient(app) as c:
        for colour in COLOURS.values():
            response = c.post("/classify", files={"image": ("x.png", png_bytes(colour), "image/png")},
                              data={"labels": "red,green"})
            assert response.status_code == 200, response.text
        gc.collect()
        assert len(made) == 2 * len(COLOURS) and all(ref() is None for ref in made)


def test_a_batch_searched_as_one_matrix_product_gets_each_querys_own_hits():
    faiss = pytest.importorskip("faiss")
    from clipzsl.search import search

    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((3000, 32)).astype(np.float32)
    queries = rng.standard_normal((40, 32)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    index = faiss.IndexFlatIP(32)
    index.add(vectors)
    setting = faiss.cvar.distance_compute_blas_threshold
    seen: list[int] = []

    class Watched:  # the index, noting FAISS's setting while it searches
        ntotal = index.ntotal

        def search(self, q, k):
            seen.append(faiss.cvar.distance_compute_blas_threshold)
            return index.search(q, k)

    scores, ids = search(Watched(), queries, 10)
    assert seen == [2] and faiss.cvar.distance_compute_blas_threshold == setting  # a product, then restored
    for query, row_scores, row_ids in zip(queries, scores, ids):
        one_scores, one_ids = search(index, query[None], 10)
        assert row_ids.tolist() == one_ids[0].tolist()
        np.testing.assert_allclose(row_scores, one_scores[0], rtol=0, atol=1e-6)  # float32 rounding
    exact = np.argsort(-(queries @ vectors.T), axis=1)[:, :10]
    assert (ids == exact).all()

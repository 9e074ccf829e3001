"""`where` over HTTP (JSON and multipart), a bad filter's 400, and the page's filter box in chromium."""
import shutil

import pytest

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
from fastapi.testclient import TestClient
from test_filter import photos

import clipzsl
from clipzsl.serve import create_app


@pytest.fixture(scope="module")
def served(tiny_clip, tmp_path_factory):
    root = tmp_path_factory.mktemp("filter-serve")
    photos(root / "p")
    index = clipzsl.ImageIndex(root / "idx", f"hf:{tiny_clip}")
    index.update(root / "p", progress=False)
    return root, index


def test_search_where_over_http(served):
    root, index = served
    with TestClient(create_app(index.model, {"photos": index.directory}, cache=root / "cache")) as client:
        hits = client.post("/search", json={"text": "red", "top_k": 5, "where": "folder = 'cats' and width > 512"})
        assert hits.status_code == 200 and [h["path"] for h in hits.json()["results"]] == [
            p for p, _ in index.search("red", 5, where="folder = 'cats' and width > 512")] != []
        image = (root / "p" / "dogs" / "blue.png").read_bytes()
        form = client.post("/search", files={"image": ("b.png", image, "image/png")},
                           data={"top_k": "5", "where": "folder != 'dogs'"})
        assert form.status_code == 200 and {h["path"].rsplit("/", 1)[1] for h in form.json()["results"]} == {
            "red.png", "pink.png"}
        bad = client.post("/search", json={"text": "red", "where": "colour = 'red'"})
        assert bad.status_code == 400 and "no column 'colour'; the columns are path, folder" in bad.json()["detail"]
        assert client.post("/search", json={"text": "red"}).status_code == 200  # the service goes on


@pytest.mark.skipif(not (shutil.which("chromium") or shutil.which("chromium-browser")), reason="no chromium")
def test_page_filter_box_in_chromium(served):
    pytest.importorskip("playwright")
    from playwright.sync_api import sync_playwright

    from benchmarks.bench_serve import CHROMIUM, running_server

    root, index = served
    with running_server(["--index", str(index.directory), "--cache-dir", str(root / "cache2")], timeout=120) as (url, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                page.goto(url)
                page.wait_for_function("document.getElementById('status').textContent.indexOf('connecting') < 0")
                page.fill("#query", "something red")
                page.fill("#where", "folder = 'cats'")
                page.press("#query", "Enter")
                page.wait_for_selector("#grid figure img")
                titles = page.eval_on_selector_all("#grid img", "imgs => imgs.map(i => i.title)")
                page.fill("#where", "width >")
                page.press("#query", "Enter")
                page.wait_for_function("document.getElementById('search-error').textContent.length > 0")
                error = page.text_content("#search-error")
            finally:
                browser.close()
    assert sorted(t.rsplit("/", 1)[1] for t in titles) == ["pink.png", "red.png"]
    assert "at position 8" in error

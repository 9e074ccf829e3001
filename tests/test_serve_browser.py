"""`clipzsl serve` started from the command line on 127.0.0.1, and its page driven in Debian's chromium:
type a query and see thumbnails; upload an image and see its labels."""
import shutil

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
pytest.importorskip("playwright", reason="the browser test drives chromium with playwright (the test extra)")
if not (shutil.which("chromium") or shutil.which("chromium-browser")):
    pytest.skip("no chromium installed (apt-get install -y chromium; .ci/run does)", allow_module_level=True)

import clipzsl  # noqa: E402
from benchmarks.bench_serve import drive_page, running_server  # noqa: E402


def test_page_searches_and_classifies_in_chromium(tiny_clip, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    for name, colour in {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220)}.items():
        Image.new("RGB", (120, 90), colour).save(photos / f"{name}.png")
    clipzsl.ImageIndex(tmp_path / "index", f"hf:{tiny_clip}").update(photos, progress=False)
    upload = photos / "red.png"
    with running_server(["--index", str(tmp_path / "index"), "--labels", "cifar10",
                         "--cache-dir", str(tmp_path / "cache")], timeout=120) as (url, _):
        seen = drive_page(url, "something red", upload, "cat,dog,bird", tmp_path / "page.png")
    assert seen["error"] == ""
    assert len(seen["thumbnails"]) == 3 and all(0 < w <= 256 for w in seen["thumbnails"])
    assert len(seen["predictions"]) == 3 and {p.split(" — ")[0] for p in seen["predictions"]} == {"cat", "dog", "bird"}
    assert (tmp_path / "page.png").stat().st_size > 1000


def test_docs_render_in_chromium_with_nothing_from_another_host(tiny_clip, tmp_path):
    from playwright.sync_api import sync_playwright

    from benchmarks.bench_serve import CHROMIUM

    args = ["--model", f"hf:{tiny_clip}", "--cache-dir", str(tmp_path / "cache")]
    with running_server(args, timeout=120) as (url, _):
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
            try:
                page = browser.new_page()
                requested: list[str] = []
                page.on("request", lambda request: requested.append(request.url))
                page.goto(f"{url}/docs")
                page.wait_for_selector("section h2")
                headings = page.eval_on_selector_all("section h2", "hs => hs.map(h => h.textContent)")
            finally:
                browser.close()
    assert {"POST/search", "POST/classify", "GET/health", "GET/images/{image_id}"} <= set(headings)
    assert requested and all(u.startswith(url) for u in requested), requested


def test_clicking_a_label_shows_its_heat_map_in_chromium(tiny_clip, tmp_path):
    from benchmarks.explain_page import drive_explain
    from clipzsl.maps import default_method

    upload = tmp_path / "photo.png"
    Image.new("RGB", (120, 90), (220, 20, 20)).save(upload)
    method = default_method(clipzsl.load_model(f"hf:{tiny_clip}"))
    args = ["--model", f"hf:{tiny_clip}", "--cache-dir", str(tmp_path / "cache")]
    with running_server(args, timeout=120) as (url, _):
        seen = drive_explain(url, upload, "cat,dog,bird", click=1, zoom=True)
    assert seen["error"] == "" and len(seen["labels"]) == 3
    assert seen["zoom_sent"] == ["true"]  # the zoom box was shown (the model draws maps) and its answer shown
    second = seen["labels"][1]
    assert seen["clicked"] == second and seen["chosen"] == [second]
    assert seen["src_before"].startswith("blob:") and seen["src_after"].startswith("blob:")
    assert seen["src_after"] != seen["src_before"]  # the top label's map was shown first, then the clicked one's
    assert second in seen["caption"] and method in seen["caption"]
    assert seen["map_size"][0] > 120 and seen["map_size"][1] > 90  # the image, its colour scale and caption

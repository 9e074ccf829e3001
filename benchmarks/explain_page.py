"""The page's heat maps in a real browser: upload a photo, click a label, see where it is.

    python -m benchmarks.explain_page [OUT.png]     # default: benchmarks/results/explain_page.png

Starts `clipzsl serve` with the packaged model and the demo labels, uploads scikit-image's cat photo
(benchmarks/samples.py) in Debian's chromium (Playwright, as benchmarks/bench_serve.py drives it),
clicks the label "cat" and saves a screenshot of the page with its heat map. `drive_explain` is what
tests/test_serve_browser.py drives too.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from benchmarks import report
from benchmarks.bench_serve import CHROMIUM, running_server

#: the heat map shown is of this label, and its image has loaded
SHOWN = ("(label) => { const img = document.getElementById('heatmap'); "
         "return img.dataset.label === label && img.complete && img.naturalWidth > 0; }")


#: records the "zoom" field of each /classify request the page sends (a multipart body with a file is not
#: visible to the browser's request events)
RECORD_ZOOM = """window.zoomSent = [];
const sendRequest = window.fetch;
window.fetch = (url, options) => {
  if (String(url).endsWith("/classify") && options && options.body instanceof FormData)
    window.zoomSent.push(options.body.get("zoom"));
  return sendRequest(url, options);
};"""


def drive_explain(url: str, image: Path, labels: str, click: str | int = 1, screenshot: Path | None = None,
                  zoom: bool = False) -> dict:
    """Upload `image` against `labels` (with the zoom box ticked, when `zoom`), wait for the top label's heat map,
    then click the label `click` (a name, or a rank counted from 0) and wait for its map. What the page showed
    before and after the click, and the zoom field of each /classify request it sent."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1000, "height": 700})
            page.add_init_script(RECORD_ZOOM)
            page.goto(url)
            page.wait_for_function("document.getElementById('status').textContent.indexOf('connecting') < 0")
            page.fill("#labels", labels)
            if zoom:
                page.check("#zoom")
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#labels-out li.prediction")
            shown = page.eval_on_selector_all("#labels-out li.prediction", "items => items.map(i => i.dataset.label)")
            page.wait_for_function(SHOWN, arg=shown[0])
            before = page.get_attribute("#heatmap", "src")
            label = click if isinstance(click, str) else shown[click]
            page.click(f"#labels-out li.prediction:nth-child({shown.index(label) + 1})")
            page.wait_for_function(SHOWN, arg=label)
            if screenshot is not None:
                page.screenshot(path=str(screenshot), full_page=True)
            return {"labels": shown, "clicked": label, "src_before": before,
                    "src_after": page.get_attribute("#heatmap", "src"),
                    "caption": page.text_content("#heatmap-caption"),
                    "chosen": page.eval_on_selector_all("#labels-out li.chosen", "items => items.map(i => i.dataset.label)"),
                    "map_size": page.eval_on_selector("#heatmap", "i => [i.naturalWidth, i.naturalHeight]"),
                    "error": page.text_content("#classify-error"),
                    "zoom_sent": page.evaluate("window.zoomSent")}
        finally:
            browser.close()


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.samples import write_samples

    argv = sys.argv[1:] if argv is None else argv
    out = Path(argv[0]) if argv else report.RESULTS_DIR / "explain_page.png"
    with tempfile.TemporaryDirectory() as work:
        cat = next(p for p in write_samples(work) if p.name == "chelsea.png")
        with running_server(["--labels", "demo"]) as (url, _):
            seen = drive_explain(url, cat, "demo", "cat", out)
    print(f"{out}: {seen['caption']}")
    return seen


if __name__ == "__main__":
    main()

"""The service under hostile load: pixel bombs, huge template lists, inline label sets, symlinks out of
an indexed folder, a re-index by another process, clients that hang up, SIGTERM, and no network for /docs.

The real `clipzsl serve` runs as a subprocess where what is checked is the process (its memory, its log,
its files after SIGTERM); the rest goes through FastAPI's test client with a tiny random HF CLIP.
"""
from __future__ import annotations

import asyncio
import io
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

pytest.importorskip("fastapi", reason="the service needs the serve extra: pip install 'clipzsl[serve]'")
httpx = pytest.importorskip("httpx", reason="FastAPI's test client needs httpx (the test extra)")
from fastapi.testclient import TestClient  # noqa: E402
from test_serve import png_bytes  # noqa: E402

import clipzsl  # noqa: E402
from benchmarks.bench_serve import running_server  # noqa: E402
from clipzsl.images import MAX_PIXELS, TooManyPixels, decode_image, load_image  # noqa: E402
from clipzsl.serve import Limits, create_app  # noqa: E402

BOMB_SIDE = 9380  # 9380 x 9380: 88 megapixels in a 257 kB PNG


def encoded(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def bomb() -> bytes:
    return encoded(Image.new("RGB", (BOMB_SIDE, BOMB_SIDE)))


@pytest.fixture(scope="module")
def model(tiny_clip):
    return clipzsl.load_model(f"hf:{tiny_clip}")


def make_index(folders: list[Path], index_dir: Path, model) -> clipzsl.ImageIndex:
    index = clipzsl.ImageIndex(index_dir, model)
    index.update(folders, progress=False)
    return index


def photos(folder: Path, colours: dict[str, tuple[int, int, int]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, colour in colours.items():
        Image.new("RGB", (40, 32), colour).save(folder / f"{name}.png")
    return folder


# -- the pixel budget ----------------------------------------------------------------------------


def test_a_pixel_bomb_is_refused_from_its_header_on_every_path(bomb, tmp_path):
    path = tmp_path / "bomb.png"
    path.write_bytes(bomb)
    for decode in (lambda: decode_image(bomb, "upload.png"), lambda: load_image(path)):
        started = time.perf_counter()
        with pytest.raises(TooManyPixels) as refused:
            decode()
        assert time.perf_counter() - started < 1.0  # not decoded: 88 M pixels take seconds
        assert "88.0 megapixels" in refused.value.reason and f"{MAX_PIXELS / 1e6:g} megapixels" in refused.value.reason
    assert str(path) in str(refused.value)


@settings(max_examples=25, deadline=None)
@given(width=st.integers(16, 2400), height=st.integers(16, 2400), side=st.integers(8, 400))
def test_a_jpeg_decodes_reduced_as_far_as_twice_what_the_model_needs(width, height, side):
    image = decode_image(encoded(Image.new("RGB", (width, height), (90, 140, 200)), "JPEG"), "x.jpg", shrink_to=side)
    scale = next(s for s in (1, 2, 4, 8) if image.size == (-(-width // s), -(-height // s)))  # StopIteration: not one
    assert scale == 1 or min(image.size) >= 2 * side  # never below twice the model's side
    assert scale == 8 or min(width, height) < 4 * scale * side  # and halved as often as that allows (at most 3 times)


def test_a_large_jpeg_fits_the_budget_once_reduced_and_matches_a_full_decode():
    photo = Image.radial_gradient("L").resize((8000, 6000)).convert("RGB")  # 48 M pixels, over the budget
    data = encoded(photo, "JPEG")
    with pytest.raises(TooManyPixels):
        decode_image(data, "big.jpg")
    reduced = decode_image(data, "big.jpg", shrink_to=224)
    assert reduced.size == (1000, 750)
    full = photo.resize((64, 48), Image.Resampling.BOX)
    diff = [abs(a - b) for a, b in zip(reduced.resize((64, 48), Image.Resampling.BOX).tobytes(), full.tobytes())]
    assert sum(diff) / len(diff) < 2


def test_the_server_refuses_a_pixel_bomb_with_422_and_bounded_memory(server, bomb):
    url, proc, _ = server
    before = peak_rss_mb(proc.pid)
    response = httpx.post(f"{url}/classify", files={"image": ("bomb.png", bomb, "image/png")},
                          data={"labels": "cat,dog"}, timeout=300)
    assert response.status_code == 422, response.text
    assert "bomb.png" in response.json()["detail"] and "--max-megapixels" in response.json()["detail"]
    assert peak_rss_mb(proc.pid) - before < 100  # a full decode took 1.6 GB at its peak, 0.9 GB kept


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


# -- templates and label sets --------------------------------------------------------------------


def test_templates_over_the_cap_are_422(model, tmp_path):
    with TestClient(create_app(model, cache=False, limits=Limits(max_templates=5))) as c:
        files = {"image": ("r.png", png_bytes(), "image/png")}
        six = "\n".join(f"template {i} of a {{}}." for i in range(6))
        refused = c.post("/classify", files=files, data={"labels": "a,b", "templates": six})
        assert refused.status_code == 422 and "6 templates" in refused.json()["detail"]
        assert "--max-templates" in refused.json()["detail"]
        five = "\n".join(six.splitlines()[:5])
        assert c.post("/classify", files=files, data={"labels": "a,b", "templates": five}).status_code == 200
        assert c.get("/health").json()["limits"]["max_templates"] == 5


def test_search_answers_while_a_big_label_set_is_encoded(model, tmp_path):
    """A /classify with 200 templates x 40 labels (8000 prompts) is encoded a text-tower pass at a time:
    /search requests sent meanwhile are answered between the passes, not after all of them."""
    index = make_index([photos(tmp_path / "photos", {"red": (220, 30, 30), "blue": (30, 40, 220)})],
                       tmp_path / "index", model)
    app = create_app(model, {"p": index.directory}, cache=False,
                     limits=Limits(max_templates=200, batch_window_s=0.0))
    templates = "\n".join(f"a picture number {i} of a {{}}." for i in range(200))
    labels = ",".join(f"thing {i}" for i in range(40))

    async def run():
        transport = httpx.ASGITransport(app=app)
        async with app.router.lifespan_context(app), httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            await c.post("/search", json={"text": "warm up", "top_k": 1})
            started = time.perf_counter()
            big = asyncio.create_task(c.post("/classify", files={"image": ("r.png", png_bytes(), "image/png")},
                                             data={"labels": labels, "templates": templates}, timeout=600))
            latencies = []
            while not big.done():
                sent = time.perf_counter()
                assert (await c.post("/search", json={"text": "red", "top_k": 1})).status_code == 200
                if not big.done():
                    latencies.append(time.perf_counter() - sent)
                await asyncio.sleep(0.02)
            return (await big), time.perf_counter() - started, latencies

    answer, took, latencies = asyncio.run(run())
    assert answer.status_code == 200, answer.text
    assert len(latencies) >= 5, (took, latencies)  # blocked, there would be one search, waiting for the whole build
    assert max(latencies) < took / 3, (took, latencies)


@settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
@given(labels=st.lists(st.text(st.characters(categories=("L", "N")), min_size=1, max_size=12),
                       min_size=2, max_size=6, unique_by=str.casefold))
def test_inline_label_sets_never_reach_the_disk_cache(labels, model, tmp_path_factory):
    """A comma list or inline templates are encoded in memory (the LRU keeps them); only the label sets the
    server names are written to the label cache, so no client can grow it on disk."""
    cache = tmp_path_factory.mktemp("cache")
    files = {"image": ("r.png", png_bytes(), "image/png")}
    with TestClient(create_app(model, label_sets={"mine": clipzsl.load_labels(["cat", "dog"])}, cache=cache)) as c:
        assert c.post("/classify", files=files, data={"labels": ",".join(labels)}).status_code == 200
        inline = c.post("/classify", files=files, data={"labels": "mine", "templates": "a {} here.\nthe {}."})
        assert inline.status_code == 200
        assert cached_labels(cache) == 0
        assert c.post("/classify", files=files, data={"labels": "mine"}).status_code == 200
        assert c.post("/classify", files=files, data={"labels": "mine", "templates": "bare"}).status_code == 200
        assert cached_labels(cache) == 4  # 2 labels x 2 template sets
        assert len(c.app.state.service.classifiers) == 4


def cached_labels(cache: Path) -> int:
    stores = list((cache / "labels").glob("*")) if (cache / "labels").exists() else []
    return sum(len(clipzsl.store.EmbeddingStore(s, **_meta(s))) for s in stores)


def _meta(store: Path) -> dict:
    meta = clipzsl.store.EmbeddingStore.read_meta(store)
    return {"fingerprint": meta["fingerprint"], "embed_dim": meta["embed_dim"]}


# -- files and ids -------------------------------------------------------------------------------


def test_a_symlink_into_the_parent_of_two_indexed_folders_is_not_served(model, tmp_path):
    """Two folders share a parent; a link in one to a file in that parent (not in either folder) is refused."""
    first = photos(tmp_path / "first", {"red": (220, 30, 30)})
    second = photos(tmp_path / "second", {"blue": (30, 40, 220)})
    secret = tmp_path / "secret.png"
    Image.new("RGB", (20, 20), (9, 9, 9)).save(secret)
    os.symlink(secret, first / "link.png")
    index = make_index([first, second], tmp_path / "index", model)
    keys = index.paths()
    with TestClient(create_app(model, {"p": index.directory}, cache=False)) as c:
        refused = c.get(f"/images/{keys.index(str(first / 'link.png'))}")
        assert refused.status_code == 404 and str(first) in refused.json()["detail"]
        assert c.get(f"/images/{keys.index(str(second / 'blue.png'))}").status_code == 200
        assert c.get(f"/images/{keys.index(str(first / 'red.png'))}").status_code == 200


REINDEX = """
import sys, time
from pathlib import Path
from PIL import Image
import clipzsl
folder, index_dir, spec, rounds = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])
index = clipzsl.ImageIndex(index_dir, spec)
for i in range(rounds):  # the oldest image goes, a new one comes
    min(folder.glob("*.png")).unlink()
    Image.new("RGB", (40, 32), (i * 9 % 255, 90, 20)).save(folder / f"n{i:03d}.png")
    index.update(folder, progress=False)
print("done", flush=True)
"""


def test_ids_stay_unique_and_stable_while_another_process_reindexes(tiny_clip, model, tmp_path):
    folder = photos(tmp_path / "photos", {f"c{i}": (40 * i, 200 - 40 * i, 90) for i in range(6)})
    index = make_index([folder], tmp_path / "index", model)
    seen: dict[int, str] = {}
    with TestClient(create_app(model, {"p": index.directory}, cache=False, limits=Limits(max_top_k=20))) as c:
        writer = subprocess.Popen([sys.executable, "-c", REINDEX, str(folder), str(index.directory),
                                   f"hf:{tiny_clip}", "24"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        answers = 0
        while writer.poll() is None or answers < 5:
            hits = c.post("/search", json={"text": "a colour", "top_k": 20}).json()["results"]
            answers += 1
            ids = [hit["id"] for hit in hits]
            assert len(set(ids)) == len(ids), hits  # never one id for two images in an answer
            for hit in hits:
                assert seen.setdefault(hit["id"], hit["path"]) == hit["path"], (hit, seen)  # nor across answers
        assert writer.wait() == 0, writer.stderr.read().decode()[-2000:]
    assert len(seen) > 6  # the service saw images come and go while it answered


# -- the process: log, signals, docs -------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_clip, tmp_path_factory):
    """`clipzsl serve` as a subprocess, with its log in a file."""
    root = tmp_path_factory.mktemp("server")
    log_path = root / "serve.log"
    args = ["--model", f"hf:{tiny_clip}", "--cache-dir", str(root / "cache")]
    with open(log_path, "w+b") as log, running_server(args, timeout=300, log=log) as (url, proc):
        yield url, proc, log_path


def wait_for(condition, timeout: float = 20):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


def test_a_client_that_hangs_up_is_one_line_in_the_log(server):
    url, _, log_path = server
    port = int(url.rsplit(":", 1)[1])
    for body in (b'{"te', b"--b\r\nContent-Disposition: form-data; name=\"top_k\"\r\n\r\n3\r\n--b"):
        kind = b"application/json" if body.startswith(b"{") else b"multipart/form-data; boundary=b"
        with socket.create_connection(("127.0.0.1", port)) as s:
            s.sendall(b"POST /search HTTP/1.1\r\nHost: x\r\nContent-Type: " + kind +
                      b"\r\nContent-Length: 5000\r\n\r\n" + body)
            time.sleep(0.3)
    wait_for(lambda: log_path.read_text().count("hung up") == 2)
    assert httpx.get(f"{url}/health").status_code == 200
    log = log_path.read_text()
    assert "Traceback" not in log and "ClientDisconnect" not in log, log
    lines = [line for line in log.splitlines() if "hung up" in line]
    assert len(lines) == 2 and all("POST /search" in line for line in lines), log


def test_a_warning_clients_can_provoke_is_logged_once(server):
    url, _, log_path = server
    for i in range(3):
        response = httpx.post(f"{url}/classify", files={"image": ("r.png", png_bytes(), "image/png")},
                              data={"labels": f"cat,Cat,dog{i}"}, timeout=120)
        assert response.status_code == 200, response.text
    assert log_path.read_text().count("repeats 1 name") == 1, log_path.read_text()


def test_sigterm_leaves_no_sqlite_wal_or_shm_files(tiny_clip, tmp_path):
    folder = photos(tmp_path / "photos", {"red": (220, 30, 30), "blue": (30, 40, 220)})
    subprocess.run([sys.executable, "-c", "import sys, clipzsl; clipzsl.ImageIndex(sys.argv[1], sys.argv[2])"
                    ".update(sys.argv[3], progress=False)", str(tmp_path / "index"), f"hf:{tiny_clip}", str(folder)],
                   check=True)
    cache = tmp_path / "cache"
    with running_server(["--index", str(tmp_path / "index"), "--cache-dir", str(cache)], timeout=300) as (url, proc):
        assert httpx.post(f"{url}/search", json={"text": "red"}).status_code == 200
        classified = httpx.post(f"{url}/classify", files={"image": ("r.png", png_bytes(), "image/png")},
                                data={"labels": "cifar10"}, timeout=120)
        assert classified.status_code == 200
        assert list((tmp_path / "index").glob("*-wal"))  # the service has the table open
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    left = [p.name for p in [*(tmp_path / "index").iterdir(), *cache.rglob("*")] if p.name.endswith(("-wal", "-shm"))]
    assert left == []


def test_docs_load_nothing_from_another_host(model):
    with TestClient(create_app(model, cache=False)) as c:
        page = c.get("/docs")
        assert page.status_code == 200 and "openapi.json" in page.text
        assert not re.search(r"(src|href)\s*=\s*[\"']?(https?:)?//", page.text), page.text
        assert "cdn" not in page.text.lower()
        assert c.get("/redoc").status_code == 404  # FastAPI's ReDoc page loads from a CDN too

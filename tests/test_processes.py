"""What a run leaves behind (issue 19 section 7): no Ray process after a killed `--engine ray` run and
nothing of Ray's in the home folder; no raw open_clip log line before clipzsl's own error."""
import importlib.util
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import numpy as np
import pytest
from PIL import Image



def session_processes(sid: int) -> list[tuple[int, str]]:
    """(pid, command) of the live processes of session `sid` (zombies excluded)."""
    out = subprocess.run(["ps", "-ww", "-eo", "pid=,sid=,stat=,args="], capture_output=True, text=True, check=True).stdout
    rows = [line.split(None, 3) for line in out.splitlines()]
    return [(int(pid), args) for pid, s, stat, args in rows if int(s) == sid and not stat.startswith("Z")]


@pytest.fixture
def ray_tmpdir():
    """RAY_TMPDIR for the run: short (Ray's socket paths must stay under 108 bytes), removed after."""
    folder = tempfile.mkdtemp(prefix="czr-")
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(importlib.util.find_spec("ray") is None, reason="ray is not installed: pip install 'clipzsl[ray]'")
def test_killed_ray_run_leaves_no_process_and_nothing_in_home(tiny_clip, tmp_path, ray_tmpdir):
    images, home, out = tmp_path / "images", tmp_path / "home", tmp_path / "out"
    images.mkdir()
    home.mkdir()
    rng = np.random.default_rng(0)
    for i in range(200):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(images / f"{i}.png")
    env = {**os.environ, "HOME": str(home), "RAY_TMPDIR": ray_tmpdir, "HF_HUB_OFFLINE": "1"}
    for name in ("RAY_ADDRESS", "RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        env.pop(name, None)
    driver = subprocess.Popen([sys.executable, "-m", "clipzsl.cli", "embed", str(images), "--out", str(out),
                               "--model", f"hf:{tiny_clip}", "--engine", "ray"], env=env, start_new_session=True,
                              stdout=subprocess.DEVNULL, stderr=open(tmp_path / "stderr", "w"))
    try:
        deadline = time.monotonic() + 240
        while not ((out / "clipzsl-run.json").exists() and any("raylet" in c for _, c in session_processes(driver.pid))):
            assert driver.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr").read_text()
            time.sleep(0.2)
        started = session_processes(driver.pid)
        os.kill(driver.pid, signal.SIGKILL)  # mid-run: the pipeline is running
        driver.wait()
        deadline = time.monotonic() + 30  # the watchdog kills, then deletes the folder: wait for both
        while ((left := session_processes(driver.pid)) or os.listdir(ray_tmpdir)) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not left, f"left running 30 s after the driver was killed: {left} (of {len(started)})"
        assert not list(home.rglob("*")), "Ray wrote in the home folder"
        assert not os.listdir(ray_tmpdir), "the run's Ray folder was not deleted 30 s after the driver was killed"
    finally:
        for pid, _ in session_processes(driver.pid):  # on failure: this test's own leftovers
            os.kill(pid, signal.SIGKILL)


# a driver that sets up a private runtime's folder and watchdog, and starts a child that keeps a log open
# there (as every Ray process does), then waits to be killed
DRIVER = """
import os, subprocess, sys, time
from clipzsl.distributed import _private_runtime
with _private_runtime() as options:
    log = options["_temp_dir"] + "/worker.log"
    child = subprocess.Popen([sys.executable, "-c", "import sys, time; log = open(sys.argv[1], 'w'); time.sleep(600)", log])
    while not os.path.exists(log):
        time.sleep(0.05)
    folder = options["_temp_dir"]
    print(folder, child.pid, flush=True)
    time.sleep(600)
"""


def test_watchdog_ends_the_runtime_of_a_terminated_driver_and_spares_others(tmp_path):
    bystander = subprocess.Popen(["sleep", "600"], cwd=tmp_path)  # not the run's: must survive
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "RAY_TMPDIR": str(tmp_path)})
    try:
        folder, child = driver.stdout.readline().split()
        driver.terminate()  # SIGTERM: no `finally` runs in the driver
        driver.wait(timeout=30)
        deadline = time.monotonic() + 20
        while (os.path.exists(folder) or os.path.exists(f"/proc/{child}/fd")) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not os.path.exists(f"/proc/{child}/fd"), "the runtime's process outlived the driver"
        assert not os.path.exists(folder) and bystander.poll() is None
    finally:
        bystander.kill()
        driver.kill()


@pytest.mark.skipif(importlib.util.find_spec("open_clip") is None, reason="open_clip is not installed")
def test_unfetchable_openclip_weights_show_only_clipzsl_message(tmp_path):
    Image.new("RGB", (32, 32), "red").save(tmp_path / "x.png")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf"),
           "CLIPZSL_CACHE_DIR": str(tmp_path / "cache")}
    run = subprocess.run([sys.executable, "-m", "clipzsl.cli", "classify", str(tmp_path / "x.png"), "--labels", "a,b",
                          "--model", "openclip:ViT-B-32/laion2b_s34b_b79k"], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 2
    assert "clipzsl: error: Could not load 'openclip:ViT-B-32/laion2b_s34b_b79k'" in run.stderr
    assert not [line for line in run.stderr.splitlines() if line.startswith(("ERROR:", "WARNING:root"))], run.stderr


def test_held_root_logs_are_passed_on_after_a_load_and_dropped_after_a_failure(caplog):
    from clipzsl.backends.hub import root_logs_held

    package = sys.modules[__name__]  # records logged from this folder stand for open_clip's
    with caplog.at_level(logging.INFO):
        with root_logs_held(package):
            logging.warning("loaded from the cache")
            assert "loaded from the cache" not in caplog.text  # held until the load ends
        with pytest.raises(RuntimeError), root_logs_held(package):
            logging.error("Failed to download weights")
            raise RuntimeError("no network")
        logging.getLogger("elsewhere").info("someone else's record")
    assert [r.getMessage() for r in caplog.records] == ["loaded from the cache", "someone else's record"]

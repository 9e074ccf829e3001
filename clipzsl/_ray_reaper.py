"""Watchdog of a local Ray runtime that clipzsl starts (`distributed._private_runtime`); run as a script.

Ray ties its GCS server and raylet to the driver (the kernel kills them when it dies), but not
the agents the raylet starts, which outlive a killed driver. This process, in a session of its
own, waits for the driver to end however it ends (its stdin, a pipe only the driver holds, then
reaches EOF; kill -9 included), kills every process that holds a file open in the run's folder
(every Ray process of the run keeps its logs there), and deletes that folder.
Standard library only: it must start fast and import nothing heavy. Linux (/proc); elsewhere it
only deletes the folder.
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time

#: how long the watchdog keeps killing (Ray may be starting workers as the driver dies)
WAIT_S = 30.0


def holders(folder: str, spare: set[int]) -> list[int]:
    """Pids of the processes, `spare` aside, with a file (or their working directory) inside `folder`."""
    inside = folder.rstrip("/") + "/"
    found = []
    for name in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not name.isdigit() or int(name) in spare:
            continue
        try:
            links = [f"/proc/{name}/cwd"] + [f"/proc/{name}/fd/{fd}" for fd in os.listdir(f"/proc/{name}/fd")]
        except OSError:  # gone meanwhile, or another user's
            continue
        for link in links:
            try:
                target = os.readlink(link)
            except OSError:
                continue
            if target.startswith(inside):
                found.append(int(name))
                break
    return found


def reap(folder: str, driver: int) -> None:
    """Kill the processes with files in `folder` until none is left (or WAIT_S passed), then delete it."""
    spare = {os.getpid(), driver}
    deadline = time.monotonic() + WAIT_S
    while (pids := holders(folder, spare)) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)
    shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.stdin.buffer.read()  # returns when the driver has closed it or died
    reap(sys.argv[1], int(sys.argv[2]))

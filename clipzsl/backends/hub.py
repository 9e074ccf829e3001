"""Fail fast, with a way out, when named hub weights cannot be fetched.

Hugging Face downloads retry for tens of seconds when the hub is unreachable. One
short socket probe decides up front: unreachable means the one load that needs the
hub reads only the local cache (weights already there still load), and a miss becomes
an error that says how to use local weights instead. Nothing outside that load is
switched offline.
"""
from __future__ import annotations

import logging
import os
import socket
from contextlib import contextmanager
from types import ModuleType
from typing import Iterator

from ..errors import ClipzslError

HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def hub_offline() -> bool:
    """Whether hub weights must come from the local cache: offline mode is asked for, or the
    hub does not answer right now."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE"):
        return True
    return not hub_reachable()


@contextmanager
def offline_for_this_load(offline: bool) -> Iterator[None]:
    """huggingface_hub's offline switch on for one load only (open_clip has no `local_files_only`),
    then back to what it was."""
    import huggingface_hub.constants

    saved = huggingface_hub.constants.HF_HUB_OFFLINE
    huggingface_hub.constants.HF_HUB_OFFLINE = saved or offline
    try:
        yield
    finally:
        huggingface_hub.constants.HF_HUB_OFFLINE = saved


@contextmanager
def root_logs_held(package: ModuleType) -> Iterator[None]:
    """Hold back what `package` logs through the root logger during one load: passed on if the load
    succeeds, dropped if it fails, since the caller then raises its own error that says what to do.
    (open_clip logs a failed download as a bare `ERROR:root:` line before raising, and that
    `logging.error` call would also configure the root logger for the whole process.)"""
    root = logging.getLogger()
    assert package.__file__ is not None  # a package loaded from files (open_clip)
    folder = os.path.dirname(package.__file__)
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if record.pathname.startswith(folder):
            held.append(record)
            return False
        return True

    placeholder = None if root.handlers else logging.NullHandler()  # with a handler, nothing gets configured
    root.addFilter(hold)
    if placeholder is not None:
        root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeFilter(hold)
        if placeholder is not None:
            root.removeHandler(placeholder)
    for record in held:  # reached only when the load succeeded
        root.handle(record)


class ModelUnavailable(ClipzslError, RuntimeError):
    """Named hub weights that are not in the local cache while the hub cannot be reached."""


def hub_error(spec: str) -> ModelUnavailable:
    """The error for hub weights that cannot be had here; it names the local alternatives."""
    return ModelUnavailable(
        f"Could not load {spec!r}: its weights are not in the local cache and the model hub "
        f"({HUB_HOST}) cannot be reached. Use local weights instead: "
        "'openclip:<arch>/<path to checkpoint>', 'hf:<local model directory>', "
        "or the offline default 'packaged'."
    )

"""Fail fast, with a way out, when named hub weights cannot be fetched.

Hugging Face downloads retry for tens of seconds when the hub is unreachable. One
short socket probe decides up front: unreachable means offline mode (weights
already in the local cache still load), and a miss becomes an error that says how
to use local weights instead.
"""
from __future__ import annotations

import os
import socket

HUB_HOST = "huggingface.co"


def hub_reachable(host: str = HUB_HOST, timeout: float = 3.0) -> bool:
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def require_hub(spec: str) -> None:
    """Switch the hub client to offline mode unless the hub answers right now."""
    import huggingface_hub.constants

    if huggingface_hub.constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE"):
        huggingface_hub.constants.HF_HUB_OFFLINE = True
        return
    if not hub_reachable():
        huggingface_hub.constants.HF_HUB_OFFLINE = True


def hub_error(spec: str) -> RuntimeError:
    return RuntimeError(
        f"Could not load {spec!r}: its weights are not in the local cache and the model hub "
        f"({HUB_HOST}) cannot be reached. Use local weights instead: "
        "'openclip:<arch>/<path to checkpoint>', 'hf:<local model directory>', "
        "or the offline default 'packaged'."
    )

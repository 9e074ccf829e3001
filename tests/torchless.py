"""Run Python in a child process where torch and the libraries built on it cannot be imported.

What a deployment without torch installed sees: `import torch` raises ModuleNotFoundError and
`importlib.util.find_spec("torch")` finds nothing usable. The child's code fails the test if anything it
runs imports one of them.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

#: the top-level packages a torch-free process must never import
BLOCKED = ("torch", "torchvision", "timm", "open_clip")

_BLOCKER = f"""
import sys

class _NoTorch:
    blocked = {BLOCKED!r}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: a torch-free process)", name=name)
        return None

sys.meta_path.insert(0, _NoTorch())
"""


def run_without_torch(script: str, cwd: Path, timeout: float = 300, env: dict | None = None
                      ) -> subprocess.CompletedProcess:
    """`script` (Python source) run by this interpreter with `BLOCKED` unimportable; its output is captured.
    The repository is first on the child's path, so it runs this checkout's clipzsl."""
    source = _BLOCKER + "\n" + textwrap.dedent(script)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), child_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, env=child_env, capture_output=True, text=True,
                          timeout=timeout)

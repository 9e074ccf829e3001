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

# Every finder on sys.meta_path is wrapped so that it finds none of them: `importlib.util.find_spec("torch")` is
# None, as where torch is not installed. (A finder that raised would break transformers, which asks find_spec
# whether torch is there before it imports anything; one that returned None would let the next finder find it.)
_BLOCKER = f"""
import sys

_loaded = sorted(m for m in sys.modules if m.split(".")[0] in {BLOCKED!r})
assert not _loaded, f"imported before the blocker: {{_loaded}}"


class _NoTorch:
    \"\"\"A meta-path finder that answers as the one it wraps, except that the blocked packages do not exist.\"\"\"

    blocked = {BLOCKED!r}

    def __init__(self, finder):
        self.finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.blocked:
            return None
        find = getattr(self.finder, "find_spec", None)
        return find(name, path, target) if find else None

    def __getattr__(self, attribute):
        return getattr(self.finder, attribute)


sys.meta_path[:] = [_NoTorch(finder) for finder in sys.meta_path]
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

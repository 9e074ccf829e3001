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

#: what the child runs first: a None entry in sys.modules is what Python's import system reads as "not
#: installed here" (`import torch` raises ModuleNotFoundError, `importlib.util.find_spec("torch")` is None)
PRELUDE = f"import sys\nsys.modules.update(dict.fromkeys({BLOCKED!r}))\n"


def run_without_torch(script: str, cwd: Path, timeout: float = 300, env: dict | None = None
                      ) -> subprocess.CompletedProcess:
    """`script` (Python source) run by this interpreter with `BLOCKED` unimportable; its output is captured.
    The repository is first on the child's path, so it runs this checkout's clipzsl."""
    source = PRELUDE + textwrap.dedent(script)
    child_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    child_env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).resolve().parents[1]), child_env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", source], cwd=cwd, env=child_env, capture_output=True, text=True,
                          timeout=timeout)


def cli_without_torch() -> list[str]:
    """The command that runs `clipzsl` (what `python -m clipzsl.cli` runs) with `BLOCKED` unimportable."""
    return [sys.executable, "-c", PRELUDE + "from clipzsl.cli import main\nsys.exit(main(sys.argv[1:]))"]

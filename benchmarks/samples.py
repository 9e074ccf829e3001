"""scikit-image's bundled sample photos, copied out as files: the demo's images.

Usage: python -m benchmarks.samples OUT_DIR
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

# photo file in skimage/data -> the demo label (prompts/labels/demo.txt) it shows
SAMPLES = {
    "astronaut.png": "astronaut",
    "chelsea.png": "cat",
    "coffee.png": "cup of coffee",
    "rocket.jpg": "rocket",
    "motorcycle_left.png": "motorcycle",
    "camera.png": "camera",
    "coins.png": "coins",
}


def sample_dir() -> Path:
    from skimage import data

    return Path(data.__file__).parent


def write_samples(out_dir: str | Path) -> list[Path]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return [Path(shutil.copy2(sample_dir() / name, out / name)) for name in SAMPLES]


if __name__ == "__main__":
    for path in write_samples(sys.argv[1] if len(sys.argv) > 1 else "build/samples"):
        print(path)

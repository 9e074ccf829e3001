"""Image decoding runs at most a bounded number of images ahead of the model (issue 12)."""
import threading
import time

import torch
from PIL import Image

from clipzsl.images import _batches


class CountingBackend:
    """Preprocessing that counts how many images were decoded."""

    def __init__(self):
        self.decoded = 0
        self.lock = threading.Lock()

    def pixels_uint8(self, image):
        with self.lock:
            self.decoded += 1
        return torch.zeros(3, 4, 4)


def test_decoding_stays_bounded_while_the_consumer_waits():
    backend = CountingBackend()
    images = [Image.new("RGB", (4, 4)) for _ in range(2000)]
    batches = _batches(backend, images, batch_size=8, workers=2)
    first = next(batches)
    time.sleep(0.5)  # a slow model: decoding must not run on through all 2000 images
    assert len(first) == 8 and backend.decoded <= 8 + 2 * 8 + 2
    rest = [index for batch in batches for index, _ in batch]
    assert [i for i, _ in first] + rest == list(range(2000)) and backend.decoded == 2000

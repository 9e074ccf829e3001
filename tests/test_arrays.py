"""The zero-shot path on numpy arrays (an onnx: model's) gives what it gives on torch tensors."""
import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clipzsl.arrays import NumpyOps, TorchOps, as_numpy, is_torch, ops
from clipzsl.head import probabilities, top_k, zero_shot_head
from clipzsl.images import EmbeddedImages

NP, TORCH = NumpyOps(), TorchOps()


def unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def logits_of(seed: int, rows: int, columns: int, scale: float) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal((rows, columns)) * scale).astype(np.float32)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**16), rows=st.integers(1, 6), columns=st.integers(1, 40), scale=st.sampled_from([0.1, 10, 300]))
def test_numpy_ops_equal_torch_ops(seed, rows, columns, scale):
    values = logits_of(seed, rows, columns, scale)
    tensor = torch.from_numpy(values)
    k = 1 + seed % columns
    got_values, got_columns = NP.top_k(values, k)
    want_values, _ = TORCH.top_k(tensor, k)
    np.testing.assert_array_equal(got_values, want_values.numpy())
    np.testing.assert_array_equal(np.take_along_axis(values, got_columns, 1), got_values)  # ties may swap columns
    for name in ("logsumexp", "softmax", "sigmoid", "exp"):
        np.testing.assert_allclose(getattr(NP, name)(values), getattr(TORCH, name)(tensor).numpy(), rtol=1e-5, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), images=st.integers(0, 9), labels=st.integers(1, 30), k=st.integers(1, 8),
       kind=st.sampled_from(["softmax", "sigmoid"]))
def test_top_k_on_numpy_equals_top_k_on_torch(seed, images, labels, k, kind):
    rng = np.random.default_rng(seed)
    embeddings, classes = (unit(rng.standard_normal((n, 16))) for n in (images, labels))  # as a model gives them
    args = (50.0, -1.0, kind, k)
    chunks = dict(image_chunk=4, label_chunk=7)  # several chunks of both, merged
    got_p, got_ids = top_k(zero_shot_head, EmbeddedImages(embeddings), classes, *args, **chunks)
    want_p, want_ids = top_k(zero_shot_head, EmbeddedImages(torch.from_numpy(embeddings)), torch.from_numpy(classes),
                             *args, **chunks)
    assert isinstance(got_p, np.ndarray) and is_torch(want_p)
    np.testing.assert_allclose(got_p, want_p.numpy(), rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(got_ids, want_ids.numpy())
    full = probabilities(zero_shot_head(EmbeddedImages(embeddings), classes, 50.0, -1.0), kind)
    np.testing.assert_allclose(got_p, -np.sort(-full, axis=1)[:, :k], rtol=1e-5, atol=1e-7)


def test_ops_and_as_numpy_follow_the_kind_of_array():
    tensor = torch.ones(2, 3, dtype=torch.float64)
    assert ops(tensor) is ops(torch.zeros(1)) and isinstance(ops(tensor), TorchOps)
    assert isinstance(ops(np.ones(2)), NumpyOps) and isinstance(ops([1, 2]), NumpyOps)
    assert as_numpy(tensor).dtype == np.float32 and as_numpy([[1, 2]]).shape == (1, 2)
    parts = [EmbeddedImages(np.ones((2, 3), np.float32)), EmbeddedImages(np.zeros((1, 3), np.float32))]
    joined = EmbeddedImages.cat(parts)
    assert isinstance(joined.embeddings, np.ndarray) and joined.subset(range(1, 3)).embeddings.tolist() == [[1] * 3, [0] * 3]

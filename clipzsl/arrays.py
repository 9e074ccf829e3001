"""The few array operations the zero-shot path needs, for torch tensors and numpy arrays alike.

A torch model gives torch tensors and a model run on onnxruntime (`onnx:DIR`) gives numpy arrays;
the code between the model and the scores (class embeddings, embedded images, the zero-shot head and
its top k) runs on either through `ops(array)`, so that a process serving an `onnx:` model never
imports torch, and a torch model keeps torch's kernels (its top k is about 10x faster than numpy's
partition on [1024, 16384] logits). torch is imported only when a torch tensor is met.
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

import numpy as np


def is_torch(array: Any) -> bool:
    """Whether `array` is a torch tensor (asked without importing torch)."""
    return type(array).__module__.partition(".")[0] == "torch"


def as_numpy(array: Any) -> np.ndarray:
    """float32 numpy on the CPU, from a torch tensor (any device or dtype) or anything numpy takes."""
    if is_torch(array):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


class Ops(Protocol):
    """The operations, named as torch names them; rows are dimension 0 and `top_k` works along dimension 1."""

    def cat(self, parts: Sequence[Any], dim: int = 0) -> Any: ...
    def stack(self, parts: Sequence[Any], dim: int = 0) -> Any: ...
    def from_numpy(self, array: np.ndarray) -> Any: ...
    def top_k(self, values: Any, k: int) -> tuple[Any, Any]: ...
    def take(self, values: Any, columns: Any) -> Any: ...
    def logsumexp(self, values: Any) -> Any: ...
    def softmax(self, values: Any) -> Any: ...
    def sigmoid(self, values: Any) -> Any: ...
    def exp(self, values: Any) -> Any: ...


class NumpyOps:
    """`Ops` over numpy arrays."""

    def cat(self, parts: Sequence[np.ndarray], dim: int = 0) -> np.ndarray:
        return np.concatenate(list(parts), axis=dim)

    def stack(self, parts: Sequence[np.ndarray], dim: int = 0) -> np.ndarray:
        return np.stack(list(parts), axis=dim)

    def from_numpy(self, array: np.ndarray) -> np.ndarray:
        return array

    def top_k(self, values: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(values, columns) of each row's k largest, largest first."""
        columns = np.argpartition(-values, k - 1, axis=1)[:, :k] if k < values.shape[1] \
            else np.broadcast_to(np.arange(values.shape[1]), values.shape)
        order = np.argsort(-np.take_along_axis(values, columns, 1), axis=1, kind="stable")
        columns = np.take_along_axis(columns, order, 1)
        return np.take_along_axis(values, columns, 1), columns.astype(np.int64)

    def take(self, values: np.ndarray, columns: np.ndarray) -> np.ndarray:
        return np.take_along_axis(values, columns, 1)

    def logsumexp(self, values: np.ndarray) -> np.ndarray:
        """Along dimension 1, stable for large logits."""
        top = values.max(axis=1, keepdims=True)
        return (top + np.log(np.exp(values - top).sum(axis=1, keepdims=True)))[:, 0]

    def softmax(self, values: np.ndarray) -> np.ndarray:
        return np.exp(values - self.logsumexp(values)[:, None])

    def sigmoid(self, values: np.ndarray) -> np.ndarray:
        return np.exp(-np.logaddexp(0, -values))  # 1 / (1 + e^-x) without overflow

    def exp(self, values: np.ndarray) -> np.ndarray:
        return np.exp(values)


class TorchOps:
    """`Ops` over torch tensors (torch is imported when the first one is built)."""

    def __init__(self) -> None:
        import torch

        self.torch = torch

    def cat(self, parts: Sequence[Any], dim: int = 0) -> Any:
        return self.torch.cat(list(parts), dim)

    def stack(self, parts: Sequence[Any], dim: int = 0) -> Any:
        return self.torch.stack(list(parts), dim)

    def from_numpy(self, array: np.ndarray) -> Any:
        return self.torch.from_numpy(array)

    def top_k(self, values: Any, k: int) -> tuple[Any, Any]:
        return values.topk(k, dim=1)

    def take(self, values: Any, columns: Any) -> Any:
        return values.gather(1, columns)

    def logsumexp(self, values: Any) -> Any:
        return self.torch.logsumexp(values, dim=1)

    def softmax(self, values: Any) -> Any:
        return self.torch.softmax(values, dim=-1)

    def sigmoid(self, values: Any) -> Any:
        return self.torch.sigmoid(values)

    def exp(self, values: Any) -> Any:
        return self.torch.exp(values)


_NUMPY = NumpyOps()
_TORCH: list[TorchOps] = []  # built on the first torch tensor


def ops(array: Any) -> Ops:
    """The operations for `array`'s kind: torch's for a torch tensor, numpy's for anything else."""
    if not is_torch(array):
        return _NUMPY
    if not _TORCH:
        _TORCH.append(TorchOps())
    return _TORCH[0]

"""Top-k labels with probabilities: the old FAISS path of `predict` against `clipzsl.head.top_k`.

The old path (before issue 11) searched a FAISS Flat index over the class embeddings for the best
k labels, then made a second full pass over every label for the softmax normaliser. `head.top_k`
makes one pass over label chunks, keeping a running top k and the chunks' log-sum-exps, and works
through any head (the adapter's too). Same random embeddings for both, in one run.

  python -m benchmarks.bench_head [--quick]
"""
from __future__ import annotations


import numpy as np
import torch
import torch.nn.functional as F

from clipzsl.head import LABEL_CHUNK, top_k, zero_shot_head
from clipzsl.images import EmbeddedImages
from clipzsl.search import build_index, search

from . import report

SCALE, K = 100.0, 5


def old_top_k(index, class_embeddings: torch.Tensor, embeddings: torch.Tensor) -> tuple[torch.Tensor, np.ndarray]:
    """What `ZeroShotClassifier.top_k_from_embeddings` computed (softmax models)."""
    similarities, ids = search(index, embeddings.numpy(), K)
    parts = [torch.logsumexp(SCALE * embeddings @ chunk.T, dim=1) for chunk in class_embeddings.split(LABEL_CHUNK)]
    normaliser = torch.logsumexp(torch.stack(parts, dim=1), dim=1)
    return torch.exp(SCALE * torch.from_numpy(similarities) - normaliser[:, None]), ids


def run(quick: bool = False) -> dict:
    labels, images, dim = (20_000 if quick else 100_000), 64, 384
    g = torch.Generator().manual_seed(0)
    class_embeddings = F.normalize(torch.randn(labels, dim, generator=g), dim=-1)
    embedded = EmbeddedImages(F.normalize(torch.randn(images, dim, generator=g), dim=-1))
    build_s, index = report.timed(lambda: build_index(class_embeddings.numpy(), "Flat"), 1)
    repeats = 5
    old_s, (old_p, old_ids) = report.timed(lambda: old_top_k(index, class_embeddings, embedded.embeddings), repeats)
    new_s, (new_p, new_ids) = report.timed(
        lambda: top_k(zero_shot_head, embedded, class_embeddings, SCALE, 0.0, "softmax", K), repeats)
    results = {
        "labels": labels, "images": images, "dim": dim, "k": K, "quick": quick,
        "old_faiss_index_build_s": build_s[0],
        "old_faiss_plus_normaliser_s": report.median(old_s),
        "new_head_top_k_s": report.median(new_s),
        "same_ids": bool((new_ids.numpy() == old_ids).all()),
        "max_abs_probability_diff": float((new_p - old_p).abs().max()),
    }
    r = results
    lines = [
        f"{labels:,} random labels x {images} random images, D = {dim}, top-{K} with softmax probabilities, "
        f"median of {repeats} runs, one process.",
        "",
        "| path | seconds |",
        "|---|---|",
        f"| old: FAISS Flat index build (once per classifier) | {r['old_faiss_index_build_s']:.3f} |",
        f"| old: FAISS Flat search + a second full pass for the normaliser | {r['old_faiss_plus_normaliser_s']:.3f} |",
        f"| new: `clipzsl.head.top_k` (one pass, label chunks of {LABEL_CHUNK:,}) | {r['new_head_top_k_s']:.3f} |",
        "",
        f"Same top-{K} ids: {r['same_ids']}; largest probability difference {r['max_abs_probability_diff']:.1e}.",
    ]
    report.write("head", results, lines)
    print("\n".join(lines))
    return results


def main(argv: list[str] | None = None) -> None:
    report.main(__doc__, "head", run, "20k labels instead of 100k", argv)


if __name__ == "__main__":
    main()

"""Heat maps of the packaged default model that keep each location's confidence.

The packaged model (`clipzsl.backends.packaged`) carries an image into the text space with ConSE: each
cell of EfficientNet's last feature map, put through the ImageNet classifier, gives class
probabilities, and the cell's token is their top-k sum of the classes' text embeddings (concepts).
The raw cosine (`maps.cosine`) L2-normalises that token, which throws the cell's confidence away: an
uncertain background cell, whose probabilities are spread, sits near the middle of the label space and
can score above the object. Each method here keeps it, in its own way (benchmarks/bench_localisation.py
measures them):

- `conse_dot`: the token left unnormalised (its norm is the probability its top-k classes hold) dotted
  with the label;
- `cam`: class activation maps (the classifier's logits per cell, a softmax over the cells per class),
  summed over the image's top classes with weights (the image's probability of the class) x (the class
  concept's cosine to the label, kept positive);
- `confident_cosine`: the cosine, times each cell's top class probability;
- `conse_centred`: `conse_dot` less each cell's mean over the labels (a label-contrastive map: what every
  label shares, such as a confident cell's pull towards the labels' common direction, cancels out);
- `conse_multiscale`: `conse_dot` read at each of SCALES (2x, 3x, 4x) and averaged on the finest grid, the
  multi-scale inference of semantic segmentation;
- `conse_flip`: `conse_dot` of the image and of its mirror image (mirrored back), averaged (test-time flip).

Every method reads the input at UPSCALE times its size (the network is convolutional): the grid is finer
(21 x 21 rather than 7 x 7 at 3) and each cell sees a part of the scene at about the scale ImageNet's
objects had: on 24 scenes, the pointing score of `confident_cosine` went from 0.15 (1x) to 0.40 (2x),
0.50 (3x) and 0.48 (4x) (bench_localisation, scenes of seed 0; its table uses other scenes). Every
method takes (model, pixels [N, 3, H, W], class embeddings [C, D]) and gives [N, C, h, w].

`conse_centred` was chosen on seed 0's 40 scenes among centred and multi-scale variants (maps at 2x, 3x and
4x averaged on the finest grid, raw or each label's min-max scaled; with and without centring) and checked
on seeds 1 and 2 (60 scenes each). Against `conse_dot`, pointing 0.500 / 0.481 / 0.526 against 0.530 /
0.487 / 0.539 (seeds 0 / 1 / 2), label sensitivity 0.456 / 0.383 / 0.449 against 0.425 / 0.328 / 0.414,
energy inside the object 0.30 / 0.29 / 0.32 against 0.14 / 0.14 / 0.14: it does not point more often, so
`conse_dot` stays the default.

`conse_multiscale` is the default, chosen by a protocol stated before measuring (bench_localisation's
CANDIDATES: `conse_dot`, `conse_multiscale`, `conse_flip`): compared on 20 scenes of each of seeds 3 and 4, then
reported once on 20 of each of held-out seeds 5, 6 and 7. Pointing:

| method | seed 3 | seed 4 | development | held out (5 / 6 / 7) | held out |
|---|---|---|---|---|---|
| `conse_dot` (3x) | 0.528 | 0.467 | 0.500 | 0.460 / 0.565 / 0.500 | 0.507 |
| `conse_multiscale` (2x, 3x, 4x) | 0.547 | 0.578 | 0.561 | 0.500 / 0.587 / 0.562 | 0.549 |
| `conse_flip` (3x) | 0.528 | 0.511 | 0.520 | 0.420 / 0.500 / 0.479 | 0.465 |

Outside the candidates, `conse_dot` read at 4x alone won seed 3 (0.604) and lost the held-out seeds (0.472):
one scale is noisier than their mean.
"""
from __future__ import annotations

import sys
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from .backends import Backend
from .errors import InputError

#: how much larger than the model's input the methods read the pixels (bilinear)
UPSCALE = 3
#: the input scales that `conse_multiscale` reads and averages
SCALES = (2, 3, 4)

if TYPE_CHECKING:
    from .backends.packaged import PackagedBackend


def is_packaged(model: Backend) -> bool:
    """Whether `model` is the packaged default (EfficientNet-Lite + MiniLM by ConSE). Its module is loaded
    only with such a model, so nothing is imported to answer."""
    packaged = sys.modules.get("clipzsl.backends.packaged")
    return packaged is not None and isinstance(model, packaged.PackagedBackend)


def _packaged(model: Backend) -> "PackagedBackend":
    if not is_packaged(model):
        raise InputError(f"this heat-map method draws only the packaged model's maps, not {model.spec}'s")
    return cast("PackagedBackend", model)


def cell_logits(model: "PackagedBackend", pixels: torch.Tensor,
                scale: float = UPSCALE) -> tuple[torch.Tensor, torch.Tensor, torch.Size]:
    """(image logits [N, K], per-cell logits [N, T, K], the grid's (h, w)) of the ImageNet classifier, on
    the pixels read at `scale` times their size."""
    pixels = F.interpolate(pixels.to(model.device).float(), scale_factor=scale, mode="bilinear", align_corners=False)
    pixels = pixels.contiguous(memory_format=torch.channels_last)
    features = model.image_model.forward_features(pixels)
    image = model.image_model.forward_head(features)
    cells = model.image_model.classifier(features.flatten(2).transpose(1, 2))
    return image.float(), cells.float(), features.shape[-2:]


def _grid(values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """[..., T] -> [..., h, w], the feature map's shape."""
    return values.reshape(*values.shape[:-1], *shape)


def _conse(model: "PackagedBackend", probs: torch.Tensor) -> torch.Tensor:
    """The model's ConSE of class probabilities [..., K] -> [..., D], not normalised."""
    from .backends.packaged import conse

    return conse(probs, model.concepts, model.top_k)


def _conse_dot(model: "PackagedBackend", pixels: torch.Tensor, class_embeddings: torch.Tensor,
               scale: float = UPSCALE, flip: bool = False) -> torch.Tensor:
    """`conse_dot`'s maps [N, C, h, w] with the pixels read at `scale`; `flip`: of the mirrored pixels, mirrored
    back (so that they lie over the pixels as given)."""
    _, cells, shape = cell_logits(model, pixels.flip(-1) if flip else pixels, scale)
    tokens = _conse(model, cells.softmax(-1))  # [N, T, D]
    scores = _grid(torch.einsum("ntd,cd->nct", tokens, class_embeddings.float()), shape)
    return scores.flip(-1) if flip else scores


def averaged(grids: list[torch.Tensor]) -> torch.Tensor:
    """The mean of maps [N, C, h_i, w_i], each resized (bilinear) to the finest grid among them."""
    size = max((g.shape[-2:] for g in grids), key=lambda shape: shape[0] * shape[1])
    return torch.stack([F.interpolate(g, size=size, mode="bilinear", align_corners=False) for g in grids]).mean(0)


def conse_dot(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Each cell's ConSE embedding, not normalised, dotted with each label."""
    return _conse_dot(_packaged(model), pixels, class_embeddings)


def conse_multiscale(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """`conse_dot` read at each of SCALES, averaged on the finest grid (multi-scale inference)."""
    model = _packaged(model)
    return averaged([_conse_dot(model, pixels, class_embeddings, scale) for scale in SCALES])


def conse_flip(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """`conse_dot` of the pixels and of their mirror image (mirrored back), averaged (test-time flip)."""
    model = _packaged(model)
    return averaged([_conse_dot(model, pixels, class_embeddings, flip=flip) for flip in (False, True)])


def conse_centred(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """`conse_dot` less each cell's mean over the labels (the same as dotting with the labels less their mean);
    with a single label, `conse_dot` (it would be zero)."""
    scores = conse_dot(model, pixels, class_embeddings)
    return scores - scores.mean(1, keepdim=True) if scores.shape[1] > 1 else scores


def confident_cosine(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Each cell's cosine to each label (`maps.cosine`'s), times the cell's top ImageNet class probability."""
    model = _packaged(model)
    _, cells, shape = cell_logits(model, pixels)
    probs = cells.softmax(-1)
    tokens = F.normalize(_conse(model, probs), dim=-1)
    cosine = torch.einsum("ntd,cd->nct", tokens, class_embeddings.float())
    return _grid(cosine * probs.max(-1).values[:, None, :], shape)


def cam(model: Backend, pixels: torch.Tensor, class_embeddings: torch.Tensor) -> torch.Tensor:
    """Class activation maps of the image's top-k ImageNet classes, as spatial distributions (softmax over the
    cells), summed with weights P(class | image) x max(0, cos(concept, label))."""
    model = _packaged(model)
    image, cells, shape = cell_logits(model, pixels)
    probs, top = image.softmax(-1).topk(model.top_k, dim=-1)  # [N, k]
    relevance = (model.concepts[top] @ class_embeddings.float().T).clamp_min(0)  # [N, k, C]
    weights = probs[..., None] * relevance  # [N, k, C]
    activation = torch.gather(cells, 2, top[:, None, :].expand(-1, cells.shape[1], -1)).softmax(1)  # [N, T, k]
    return _grid(torch.einsum("ntk,nkc->nct", activation, weights), shape)

"""A class-agnostic cross-attention adapter over a frozen dual encoder.

Queries come from the (prompt-ensembled) class text embeddings, keys and values from the
image's spatial tokens (plus its pooled embedding as one extra "global" token). Each class
attends over the image regions and gets a class-conditioned context vector c_nc; its score
cos(c_nc, t_c) is added to the zero-shot cosine through a residual weight `alpha`:

    logit_nc = s * (cos(x_n, t_c) + alpha * cos(c_nc, t_c)) + b

`alpha` starts at 0, so an untrained adapter *is* the zero-shot classifier, bit for bit.
No parameter depends on the number or identity of classes, so the adapter applies to
any label set, seen in training or not. The backbone is never touched: its features
(pooled + tokens, `clipzsl.images.embed_images_cached`) are computed once and every epoch
runs only the adapter.

The adapter is a head (`CrossAttentionAdapter.head`, the signature of `clipzsl.head.Head`),
so the classifier, `top_k` and the evaluation score through it as through the zero-shot
head. Training lives in `clipzsl.training`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Sequence, TypeVar

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as safetensors_bytes

from .backends.base import Backend
from .errors import ClipzslError, InputError, InputTypeError
from .head import cosine_logits
from .images import EmbeddedImages
from .records import RecordError, canonical, load, parse
from .store import atomic_write

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

CONFIG_NAME = "adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT_NAME = "clipzsl-cross-attention-adapter"
#: 2: the weights' header holds a copy of adapter.json (RECORD_KEY), which it must match on load
FORMAT_VERSION = 2
RECORD_KEY = "clipzsl_record"
R = TypeVar("R", bound="DataclassInstance")


class AdapterError(ClipzslError, ValueError):
    """A saved adapter that cannot be used: damaged files (whose scores would be NaN or silently
    wrong), or, as `AdapterMismatch`, one made for another backbone."""


class AdapterMismatch(AdapterError):
    """An adapter saved for another backbone (or embedding size) than the one it is used with."""


def _damaged(path: Path, problem: str) -> AdapterError:
    return AdapterError(f"{path}: {problem}; the saved adapter is damaged: retrain it (clipzsl train-adapter) "
                        "or copy it again from where it was trained")


# ------------------------------------------------------------------ the adapter


@dataclass
class AdapterConfig:
    dim: int
    heads: int = 4
    attn_dim: int | None = None  # width of q/k/v; default = dim
    dropout: float = 0.0
    global_token: bool = True  # the pooled embedding joins the tokens as one more key/value

    def __post_init__(self):
        """Refuses what would divide by zero or silently score differently (`heads` 0, a negative width)."""
        for name in ("dim", "heads", "attn_dim"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise InputError(f"{name} must be at least 1, got {value}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"dropout must be in [0, 1), got {self.dropout}")
        self.attn_dim = self.attn_dim or self.dim
        if self.attn_dim % self.heads:
            raise InputError(f"attn_dim {self.attn_dim} is not divisible by heads {self.heads}")

    @property
    def width(self) -> int:
        """The width of q/k/v (`attn_dim`, which defaults to `dim`)."""
        return self.attn_dim or self.dim


@dataclass(frozen=True)
class Calibration:
    """Calibrated stacking (Chao et al. 2016) fitted for a saved adapter (`clipzsl.calibration.fit_gamma`):
    `gamma` is subtracted from the logits of the labels it was fitted on (`seen_labels`) when a label set
    mixes them with others. Added to adapter.json after the weights were written (not in their header's copy)."""

    gamma: float
    seen_labels: list[str]
    data: str  # the class folders the seen-class validation split was drawn from
    seed: int
    val_images: int
    val_h_plain: float  # H of seen / pseudo-unseen validation accuracy without gamma
    val_h_calibrated: float  # ... and with it


@dataclass(frozen=True)
class AdapterRecord:
    """The schema of adapter.json (read through `clipzsl.records`)."""

    format: Literal["clipzsl-cross-attention-adapter"]
    version: Literal[1, 2]
    config: AdapterConfig
    backbone_fingerprint: str
    backbone_spec: str | None = None
    templates: list[str] | None = None
    trained_labels: list[str] | None = None
    weights_sha256: str | None = None  # adapters saved before checksums have none
    training: dict | None = None  # what train-adapter chose (`clipzsl.training.fit_with_selection`'s info)
    calibration: Calibration | None = None


class CrossAttentionAdapter(nn.Module):
    """Multi-head cross-attention: class text embeddings [C, D] attend over image tokens [N, T, D].

    q/k/v/out projections start at the identity, so before training the context of class c
    is a text-guided attention pooling of the image's (normalised) tokens; `alpha` (the
    residual weight of the adapter's score) starts at 0, so logits equal zero-shot ones.
    """

    def __init__(self, dim: int, heads: int = 4, attn_dim: int | None = None, dropout: float = 0.0,
                 global_token: bool = True, meta: dict | None = None):
        """`meta`: the saved adapter.json (backbone fingerprint, templates, labels) when loaded."""
        super().__init__()
        self.config = AdapterConfig(dim, heads, attn_dim, dropout, global_token)
        self.meta = meta or {}
        a = self.config.width
        self.token_norm = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, a)
        self.k = nn.Linear(dim, a)
        self.v = nn.Linear(dim, a)
        self.out = nn.Linear(a, dim)
        for lin in (self.q, self.k, self.v, self.out):
            with torch.no_grad():
                lin.weight.copy_(torch.eye(lin.out_features, lin.in_features))
                lin.bias.zero_()
        # attention logits are (q . k) * exp(log_tau); text/LN'd-token dot products are O(1)
        self.log_tau = nn.Parameter(torch.tensor(math.log(10.0)))
        self.alpha = nn.Parameter(torch.zeros(()))
        self.drop = nn.Dropout(dropout)

    # -- pieces
    def _keys_values(self, tokens: torch.Tensor, pooled: torch.Tensor | None):
        if self.config.global_token:
            if pooled is None:
                raise InputError("this adapter uses the pooled embedding as a global token: pass `pooled`")
            tokens = torch.cat([pooled[:, None, :].to(tokens.dtype), tokens], dim=1)
        h, a = self.config.heads, self.config.width
        n, t, _ = tokens.shape
        k = self.k(self.token_norm(tokens)).view(n, t, h, a // h)
        v = self.v(F.normalize(tokens, dim=-1)).view(n, t, h, a // h)
        return k, v

    def _queries(self, class_embeddings: torch.Tensor) -> torch.Tensor:
        h, a = self.config.heads, self.config.width
        return self.q(class_embeddings).view(class_embeddings.shape[0], h, a // h)

    def attention(self, class_embeddings: torch.Tensor, tokens: torch.Tensor,
                  pooled: torch.Tensor | None = None) -> torch.Tensor:
        """Attention weights [N, C, heads, T'] (T' = T + 1 with the global token first)."""
        k, _ = self._keys_values(tokens, pooled)
        q = self._queries(class_embeddings)
        scores = torch.einsum("chd,nthd->nhct", q, k) * self.log_tau.exp() / math.sqrt(q.shape[-1])
        return scores.softmax(-1).permute(0, 2, 1, 3)

    def context(self, class_embeddings: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor | None = None):
        """(class-conditioned context [N, C, D], attention [N, C, heads, T'])."""
        k, v = self._keys_values(tokens, pooled)
        q = self._queries(class_embeddings)
        scores = torch.einsum("chd,nthd->nhct", q, k) * self.log_tau.exp() / math.sqrt(q.shape[-1])
        attn = self.drop(scores.softmax(-1))
        ctx = torch.einsum("nhct,nthd->nchd", attn, v).reshape(k.shape[0], q.shape[0], -1)
        return self.out(ctx), attn.permute(0, 2, 1, 3)

    def adapter_scores(self, class_embeddings, tokens, pooled=None) -> torch.Tensor:
        """cos(context_nc, t_c): [N, C]."""
        ctx, _ = self.context(class_embeddings, tokens, pooled)
        return (F.normalize(ctx, dim=-1) * F.normalize(class_embeddings, dim=-1)[None]).sum(-1)

    def forward(self, class_embeddings: torch.Tensor, tokens: torch.Tensor, pooled: torch.Tensor,
                logit_scale: float, logit_bias: float = 0.0, return_parts: bool = False):
        """Final logits [N, C] = s * pooled @ t.T + s * alpha * cos(context, t) + b.

        The zero-shot part is `clipzsl.head.cosine_logits`, so with alpha = 0 the result is
        bit-identical to the zero-shot head's."""
        zs = cosine_logits(pooled, class_embeddings, logit_scale)
        if not return_parts and not self.training and float(self.alpha.detach()) == 0.0:
            return zs + logit_bias  # exactly zero-shot, and no attention to compute
        ad = self.adapter_scores(class_embeddings, tokens, pooled)
        out = zs + logit_scale * self.alpha * ad + logit_bias
        return (out, zs + logit_bias) if return_parts else out

    @torch.no_grad()
    def head(self, images: EmbeddedImages, class_embeddings: torch.Tensor, logit_scale: float,
             logit_bias: float = 0.0, batch_size: int = 128) -> torch.Tensor:
        """Evaluation logits [N, C] (a `clipzsl.head.Head`), in image batches (bounded memory for
        many classes). The images need their spatial tokens (`return_tokens=True`)."""
        tokens = tokens_of(images)
        was = self.training
        self.eval()
        out = [self(class_embeddings, tokens[i:i + batch_size], images.embeddings[i:i + batch_size],
                    logit_scale, logit_bias) for i in range(0, len(images), batch_size)]
        self.train(was)
        return torch.cat(out) if out else torch.empty(0, class_embeddings.shape[0])

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- persistence
    def save(self, directory: str | os.PathLike, model: Backend | None = None, fingerprint: str | None = None,
             templates: Sequence[str] | None = None, labels: Sequence[str] | None = None,
             extra: dict | None = None) -> Path:
        """Weights as safetensors + a JSON config with the backbone fingerprint, templates and labels.

        The weights' header holds a copy of the config (and their sha256 is in the config), so `load`
        refuses a config edited by hand: `heads` changes the scores without changing any tensor's shape.
        `extra`: more adapter.json fields of `AdapterRecord` (`training`)."""
        directory = Path(directory)
        fp = fingerprint or (model.fingerprint if model is not None else None)
        if fp is None:
            raise InputError("save() needs the backbone (or its fingerprint) the adapter was trained on")
        meta = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "config": asdict(self.config),
            "backbone_fingerprint": fp,
            "backbone_spec": getattr(model, "spec", None),
            "templates": list(templates) if templates is not None else None,
            "trained_labels": list(labels) if labels is not None else None,
            **(extra or {}),
        }
        return write_adapter(directory, AdapterRecord, meta, self.state_dict())

    @classmethod
    def load(cls, directory: str | os.PathLike, model: Backend | None = None) -> "CrossAttentionAdapter":
        """Load a saved adapter; with `model`, refuse one trained on another backbone.

        Damaged or edited files raise `AdapterError` naming the file (and the field): adapter.json
        against its schema and against the copy in the weights' header, the weights against their
        recorded sha256, the config's tensor shapes, and finiteness.
        """
        record, blob = read_record(directory, AdapterRecord)
        check_backbone(directory, record.backbone_fingerprint, record.backbone_spec, record.config.dim, model)
        adapter = cls(**asdict(record.config), meta=asdict(record))
        adapter.load_state_dict(_tensors(Path(directory) / WEIGHTS_NAME, blob, adapter.state_dict()))
        return adapter.eval()


# ------------------------------------------------------------------ saved adapters of any kind

#: fields of adapter.json written after the weights (so not in the copy their header holds)
LATER_FIELDS = ("weights_sha256", "calibration")


def write_adapter(directory: str | os.PathLike, schema: type, meta: dict, state: dict[str, torch.Tensor]) -> Path:
    """`state` as adapter.safetensors (its header holding a copy of `meta`) and `meta`, with the weights'
    sha256, as adapter.json, each written atomically; `meta` is checked against `schema` first (never
    write what the loader would refuse)."""
    directory = Path(directory)
    parse(schema, meta, directory / CONFIG_NAME)
    tensors = {k: v.detach().contiguous() for k, v in state.items()}
    weights = safetensors_bytes(tensors, metadata={"fingerprint": meta["backbone_fingerprint"],
                                                   RECORD_KEY: canonical(meta).decode()})
    meta = {**meta, "weights_sha256": hashlib.sha256(weights).hexdigest()}
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write(directory / WEIGHTS_NAME, lambda f: f.write(weights))
    atomic_write(directory / CONFIG_NAME, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return directory


def read_record(directory: str | os.PathLike, schema: type[R]) -> tuple[R, bytes]:
    """adapter.json as `schema` and the bytes of adapter.safetensors, checked against each other (the copy
    of adapter.json in the weights' header, their sha256): an AdapterError naming the file and field."""
    directory = Path(directory)
    config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
    try:
        record = load(schema, config_path)
    except FileNotFoundError as err:
        raise FileNotFoundError(f"{directory}: no {CONFIG_NAME}; not a saved clipzsl adapter") from err
    except RecordError as err:
        raise _damaged(config_path, err.detail) from err
    blob = _weights_blob(weights_path, getattr(record, "weights_sha256"))
    _check_record(config_path, asdict(record), _header_metadata(weights_path, blob), schema)
    return record, blob


def check_backbone(directory: str | os.PathLike, fingerprint: str, spec: str | None, dim: int,
                   model: Backend | None) -> None:
    """An AdapterMismatch unless the adapter saved in `directory` was made with `model` (None: no check)."""
    if model is None:
        return
    if fingerprint != model.fingerprint:
        raise AdapterMismatch(
            f"adapter {directory} was trained on backbone {fingerprint!r} (spec {spec!r}), but the model in use is "
            f"{model.fingerprint!r} (spec {model.spec!r}); train an adapter for this backbone or load the one it "
            "was trained on")
    if dim != model.embed_dim:
        raise AdapterMismatch(f"adapter {directory} has dim {dim}, model {model.spec!r} has {model.embed_dim}")


def rewrite_record(directory: str | os.PathLike, schema: type, **later: object) -> dict:
    """adapter.json again with `later` fields (of `LATER_FIELDS`, such as "calibration") replaced: read and
    checked as loading does, validated against `schema`, then written atomically in one rename, so a killed
    run leaves the previous file. The weights are not touched. Returns the new record as a dict."""
    unknown = sorted(set(later) - set(LATER_FIELDS))
    if unknown:
        raise InputError(f"only {LATER_FIELDS} may change after an adapter is saved, not {unknown}")
    record: DataclassInstance = read_record(directory, schema)[0]
    meta = {**asdict(record), **later}
    path = Path(directory) / CONFIG_NAME
    parse(schema, meta, path)
    atomic_write(path, lambda f: f.write(json.dumps(meta, indent=2).encode()))
    return meta


def tokens_of(images: EmbeddedImages) -> torch.Tensor:
    """The images' spatial tokens, which the adapter and the heatmaps attend over; an InputError if they
    were embedded without them."""
    if images.tokens is None:
        raise InputError("the adapter attends over spatial tokens: embed the images with return_tokens=True")
    return images.tokens


def _weights_blob(path: Path, sha256: str | None) -> bytes:
    """The bytes of the weights file, checked against the recorded checksum (None: older adapters)."""
    try:
        blob = path.read_bytes()
    except FileNotFoundError as err:
        raise _damaged(path, "missing") from err
    if sha256 is not None and hashlib.sha256(blob).hexdigest() != sha256:
        raise _damaged(path, f"its sha256 differs from the one recorded in {path.with_name(CONFIG_NAME)} at save")
    return blob


def _header_metadata(path: Path, blob: bytes) -> dict:
    """The `__metadata__` of a safetensors file's JSON header."""
    try:
        size = int.from_bytes(blob[:8], "little")
        header = json.loads(blob[8:8 + size]) if 0 < size <= len(blob) - 8 else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        header = None
    if not isinstance(header, dict):
        raise _damaged(path, "not a readable safetensors file (no JSON header)")
    return header.get("__metadata__") or {}


def _check_record(config_path: Path, meta: dict, header: dict, schema: type) -> None:
    """adapter.json must say what the weights were saved with: the copy of it in their header (version
    2 and every Tip adapter), or at least the backbone fingerprint (version 1)."""
    weights_path = config_path.with_name(WEIGHTS_NAME)
    ours = {k: v for k, v in meta.items() if k not in LATER_FIELDS}
    if RECORD_KEY in header:
        try:
            saved = asdict(parse(schema, json.loads(header[RECORD_KEY]), weights_path))
        except (json.JSONDecodeError, RecordError) as err:
            raise _damaged(weights_path, f"unreadable copy of {CONFIG_NAME} in its header ({err})") from err
        saved = {k: v for k, v in saved.items() if k not in LATER_FIELDS}
    elif meta["format"] != FORMAT_NAME or meta["version"] >= 2:
        raise _damaged(weights_path, f"no copy of {CONFIG_NAME} in its header")
    else:
        saved = {"backbone_fingerprint": header.get("fingerprint", meta["backbone_fingerprint"])}
        ours = {"backbone_fingerprint": meta["backbone_fingerprint"]}
    where = _difference(saved, ours)
    if where is not None:
        raise _damaged(config_path, f"field {where!r} differs from the one the weights in {WEIGHTS_NAME} were saved "
                                    f"with (edited by hand?); restore it")


def _difference(saved, ours, prefix: str = "") -> str | None:
    """The first dotted field where two decoded JSON values differ, or None."""
    if isinstance(saved, dict) and isinstance(ours, dict):
        for key in sorted(set(saved) | set(ours)):
            if key not in saved or key not in ours:
                return prefix + key
            found = _difference(saved[key], ours[key], f"{prefix}{key}.")
            if found is not None:
                return found
        return None
    return None if canonical(saved) == canonical(ours) else prefix.rstrip(".")


def _tensors(path: Path, blob: bytes, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of the weights file, checked against the adapter's own state dict (names, shapes),
    and all finite."""
    try:
        state = load_safetensors(blob)
    except SafetensorError as err:
        raise _damaged(path, f"not a readable safetensors file ({err})") from err
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if state[k].shape != expected[k].shape)
    if missing or unexpected or shapes:
        raise _damaged(path, f"its tensors do not fit the config in {CONFIG_NAME} (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, wrong shape {shapes[:3]})")
    bad = sorted(k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all())
    if bad:
        raise _damaged(path, f"non-finite values (NaN or inf) in {bad[:3]}")
    return state


def resolve_adapter(adapter: CrossAttentionAdapter | str | os.PathLike, model: Backend) -> CrossAttentionAdapter:
    """An adapter object (checked for dim) or a saved directory (checked for backbone)."""
    if isinstance(adapter, (str, os.PathLike)):
        return CrossAttentionAdapter.load(adapter, model)
    if not isinstance(adapter, CrossAttentionAdapter):
        raise InputTypeError(f"adapter must be a CrossAttentionAdapter or a saved adapter directory, got {type(adapter)}")
    if adapter.config.dim != model.embed_dim:
        raise AdapterMismatch(f"adapter dim {adapter.config.dim} != model {model.spec!r} dim {model.embed_dim}")
    fp = adapter.meta.get("backbone_fingerprint")
    if fp is not None and fp != model.fingerprint:
        raise AdapterMismatch(f"adapter was trained on backbone {fp!r}, not {model.fingerprint!r}")
    return adapter.eval()

"""Choosing the packaged default by measurement (issue 6): what each change to the ConSE recipe gains.

Test sets (never used to choose anything): Tux Paint (all stamps, every distinct description a label)
and two held-out emoji art styles, OpenMoji and Fluent 3D (labels: every object-like emoji class).
Validation, on which every choice is made: the Twemoji and Noto emoji styles (the same label set, other
artists). The packaged image tower's ImageNet logits are computed once per (variant, preprocessing) and
cached; every recipe below re-scores them, so a row costs seconds.

Directions measured: preprocessing (centre crop, whole image, white margin), flip test-time
augmentation, larger towers (lite1, lite2), the number of concepts T and a temperature on the ImageNet
softmax, richer concept text (WordNet synonyms, parent, definition), other ways to match images and
labels (log-sum-exp over concepts, the WordNet hierarchy's inner nodes, a hubness correction), and
learned alignments (DeViSE on the classifier's weight rows; a map trained on seen emoji classes, a proxy
only). Then the calibration of the chosen recipe's probabilities (ECE before and after a logit scale
fitted on validation) and its cost in images/s.

Usage: python -m benchmarks.bench_default [--quick]
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES
from PIL import Image

import clipzsl
from clipzsl import metrics
from clipzsl.backends import packaged

from . import common, datasets, report

NAME = "default"
VALIDATION = ["twemoji", "noto"]
TEST = ["tuxpaint", "openmoji", "fluent3d"]
TEMPLATE = "a photo of a {}."
QUICK_IMAGES = 150
#: the packaged default's logit scale before this benchmark fitted one
OLD_SCALE = 20.0
#: the baseline the issue states for the lite0 ConSE recipe on Tux Paint, top-1 %
ISSUE_BASELINE_TUXPAINT = 13.9


# ---------------------------------------------------------------- data and cached ImageNet logits


def load_sets(quick: bool) -> dict[str, datasets.Dataset]:
    """Validation and test sets; emoji styles share one label set (every object-like class)."""
    emoji = datasets.load("emoji")
    sets = {}
    for style in VALIDATION + TEST[1:]:
        keep = [i for i, g in enumerate(emoji.groups) if g == style]
        sets[style] = datasets.Dataset(f"emoji_{style}", emoji.classnames, [emoji.images[i] for i in keep],
                                       [emoji.labels[i] for i in keep], "drawings", source=emoji.source)
    tux = datasets.load("tuxpaint")
    names = sorted({c.lower() for c in tux.classnames})  # 'letter A' and 'letter a' are one label
    tux.labels = [names.index(tux.classnames[y].lower()) for y in tux.labels]
    tux.classnames = names
    sets["tuxpaint"] = tux
    if quick:
        for ds in sets.values():
            idx = datasets.balanced_indices(ds.labels, QUICK_IMAGES)
            ds.images, ds.labels = [ds.images[i] for i in idx], [ds.labels[i] for i in idx]
    return sets


def white_margin(image: Image.Image, factor: float) -> Image.Image:
    """The image centred on a white square `factor` times its longer side."""
    side = int(max(image.size) * factor)
    canvas = Image.new("RGB", (side, side), (255, 255, 255))
    canvas.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    return canvas


PREPROCESSING = {
    "crop": lambda size: packaged.image_transform(size, crop=True),
    "whole": lambda size: packaged.image_transform(size, crop=False),
    "margin1.4": lambda size: (lambda im, t=packaged.image_transform(size): t(white_margin(im, 1.4))),
}


class Towers:
    """ImageNet logits and pooled features per (variant, preprocessing, flip, set), cached as .npz."""

    def __init__(self, sets: dict[str, datasets.Dataset], cache: Path):
        self.sets, self.cache, self.models = sets, cache, {}
        self.images_per_s: dict[str, float] = {}

    def model(self, variant: str):
        if variant not in self.models:
            self.models[variant] = packaged.PackagedBackend(variant)
        return self.models[variant]

    def get(self, variant: str, prep: str, name: str, flip: bool = False) -> dict[str, np.ndarray]:
        ds = self.sets[name]
        model = self.model(variant)
        key = hashlib.sha256(f"{model.fingerprint}|{prep}|{flip}|{ds.name}|{ds.labels}".encode()).hexdigest()[:16]
        path = self.cache / f"{variant}-{prep}-{'flip-' if flip else ''}{name}-{key}.npz"
        if path.exists():
            return dict(np.load(path))
        transform = PREPROCESSING[prep](packaged.RESOLUTION[variant])
        logits, feats = [], []
        start = time.perf_counter()
        for i in range(0, len(ds), 64):
            x = torch.stack([transform(im.convert("RGB")) for im in ds.images[i:i + 64]])
            with torch.inference_mode():
                pooled = model.image_model.forward_head(model.image_model.forward_features(
                    x.flip(-1) if flip else x), pre_logits=True)
                logits.append(model.image_model.classifier(pooled).numpy())
                feats.append(pooled.numpy())
        out = {"logits": np.concatenate(logits), "feats": np.concatenate(feats)}
        print(f"default: {variant} {prep}{' flip' if flip else ''} {name}: {len(ds) / (time.perf_counter() - start):.1f}"
              " img/s", flush=True)
        self.cache.mkdir(parents=True, exist_ok=True)
        np.savez(path, **out)
        return out


# ---------------------------------------------------------------- text: labels and ImageNet concepts


def wordnet_imagenet() -> tuple[list[str], dict[str, tuple[list[str], list[str], str]]]:
    """ImageNet's synset ids (timm's list, WordNet 3.0 offsets) and WordNet's noun graph:
    id -> (lemmas, hypernym ids, gloss)."""
    import timm

    from clipzsl.vocab import fetch_wordnet, lemma_text

    ids = (Path(timm.__file__).parent / "data/_info/imagenet_synsets.txt").read_text().split()
    graph = {}
    for line in fetch_wordnet().read_text(encoding="utf-8").splitlines():
        if line.startswith("  ") or not line.strip():
            continue
        head, _, gloss = line.partition(" | ")
        f = head.split()
        n = int(f[3], 16)
        pointers = f[4 + 2 * n:]  # count, then (symbol, offset, pos, source/target) per pointer
        hyper = ["n" + pointers[i + 1] for i in range(1, 1 + 4 * int(pointers[0]), 4)
                 if pointers[i] in ("@", "@i") and pointers[i + 2] == "n"]
        graph["n" + f[0]] = ([lemma_text(w) for w in f[4:4 + 2 * n:2]], hyper, gloss.split(";")[0].strip())
    return ids, graph


def concept_texts(ids: list[str], graph: dict) -> dict[str, list[str]]:
    """Concept prompt lists per recipe (one template; the 7-template ensemble is built separately)."""
    names = list(IMAGENET_CLASSNAMES)
    return {
        "name": [TEMPLATE.format(n) for n in names],
        "name + WordNet synonyms": [TEMPLATE.format(", ".join(dict.fromkeys([n] + graph[i][0][:3])))
                                    for n, i in zip(names, ids)],
        "name + WordNet parent": [f"a photo of a {n}, a kind of {graph[graph[i][1][0]][0][0]}."
                                  for n, i in zip(names, ids)],
        "name + WordNet definition": [f"{n}: {graph[i][2]}" for n, i in zip(names, ids)],
    }


def hierarchy(ids: list[str], graph: dict) -> tuple[list[str], np.ndarray]:
    """WordNet's inner nodes above the 1,000 leaves and the leaf -> ancestor membership [1000, M]."""
    ancestors = []
    for leaf in ids:
        seen, stack = [], [leaf]
        while stack:
            for parent in graph[stack.pop()][1]:
                if parent not in seen:
                    seen.append(parent)
                    stack.append(parent)
        ancestors.append(seen)
    nodes = list(dict.fromkeys(a for chain in ancestors for a in chain))
    index = {n: j for j, n in enumerate(nodes)}
    member = np.zeros((len(ids), len(nodes)), np.float32)
    for i, chain in enumerate(ancestors):
        member[i, [index[a] for a in chain]] = 1
    return nodes, member


# ---------------------------------------------------------------- scoring recipes


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return torch.from_numpy(logits / temperature).softmax(-1).numpy()


def conse(probs: np.ndarray, concepts: np.ndarray, top_k: int) -> np.ndarray:
    return unit(packaged.conse(torch.from_numpy(probs), torch.from_numpy(concepts), top_k).numpy())


def log_sum_exp(probs: np.ndarray, concepts: np.ndarray, labels: np.ndarray, tau: float) -> np.ndarray:
    """log sum_c p(c|x) exp(cos(concept c, label) / tau): each label is matched to its best concepts."""
    s = concepts @ labels.T / tau
    top = s.max(0, keepdims=True)
    return np.log(probs @ np.exp(s - top) + 1e-30) + top


def top1(scores: np.ndarray, labels: list[int]) -> float:
    return 100 * metrics.accuracy(torch.as_tensor(scores), labels)


# ---------------------------------------------------------------- learned alignments


def devise_on_classifier_rows(weights: torch.Tensor, concepts: np.ndarray, steps: int = 2000) -> torch.nn.Linear:
    """A linear map from image-feature space to text space, trained contrastively on the ImageNet
    classifier's 1,000 weight rows paired with their class-name embeddings (no images)."""
    torch.manual_seed(0)
    rows = F.normalize(weights, dim=-1)
    target = torch.from_numpy(concepts)
    linear = torch.nn.Linear(rows.shape[1], target.shape[1], bias=False)
    opt = torch.optim.AdamW(linear.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(steps):
        loss = F.cross_entropy(F.normalize(linear(rows), dim=-1) @ target.T / 0.05, torch.arange(len(rows)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return linear.eval()


def seen_class_map_proxy(train: list[tuple[np.ndarray, np.ndarray, list[int]]],
                         test: list[tuple[np.ndarray, np.ndarray, list[int]]], labels: np.ndarray) -> dict:
    """Would a learned map generalise to classes it never saw? Train a residual linear map on the
    validation styles' images of half the emoji classes, test on the held-out styles' images of the
    other half, against plain ConSE on the same half. A proxy: its labels are test labels, so it is
    never a candidate for the default; it says whether collecting non-test image-text pairs is worth it."""
    classes = len(labels)
    perm = np.random.default_rng(0).permutation(classes)
    seen, unseen = np.sort(perm[:classes // 2]), np.sort(perm[classes // 2:])
    feats = torch.from_numpy(np.concatenate([t[0] for t in train]))
    base = torch.from_numpy(np.concatenate([t[1] for t in train]))
    y = np.concatenate([t[2] for t in train])
    keep = np.isin(y, seen)
    feats, base, y = feats[keep], base[keep], y[keep]
    remap = {c: j for j, c in enumerate(seen)}
    target = torch.tensor([remap[c] for c in y])
    mean, std = feats.mean(0), feats.std(0) + 1e-6
    text = torch.from_numpy(labels)
    torch.manual_seed(0)
    linear = torch.nn.Linear(feats.shape[1], text.shape[1])
    torch.nn.init.zeros_(linear.weight)
    torch.nn.init.zeros_(linear.bias)
    opt = torch.optim.AdamW(linear.parameters(), 1e-3, weight_decay=1e-2)
    for _ in range(300):
        loss = F.cross_entropy(F.normalize(base + linear((feats - mean) / std), dim=-1) @ text[seen].T * 20, target)
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = {"zero-shot ConSE": [], "learned map": []}
    for f, b, yt in test:
        m = np.isin(yt, unseen)
        with torch.no_grad():
            mapped = F.normalize(torch.from_numpy(b) + linear((torch.from_numpy(f) - mean) / std), dim=-1).numpy()
        for key, emb in (("zero-shot ConSE", b), ("learned map", mapped)):
            pred = unseen[(unit(emb[m]) @ labels[unseen].T).argmax(1)]
            out[key].append(100 * float((pred == np.asarray(yt)[m]).mean()))
    return {k: float(np.mean(v)) for k, v in out.items()}


# ---------------------------------------------------------------- the experiment


def run(quick: bool = False) -> dict:
    load_before = common.load_average()
    start = time.perf_counter()
    sets = load_sets(quick)
    towers = Towers(sets, datasets.cache_root() / "features" / "default")
    lite0 = towers.model("lite0")

    def text(prompts: list[str]) -> np.ndarray:  # MiniLM, L2-normalised
        return clipzsl.encode_prompts(lite0, prompts, progress=False).numpy()

    labels = {n: text([TEMPLATE.format(c) for c in ds.classnames]) for n, ds in sets.items()}
    truth = {n: ds.labels for n, ds in sets.items()}
    ids, graph = wordnet_imagenet()
    concept_sets = {k: text(v) for k, v in concept_texts(ids, graph).items()}
    baseline_concepts = lite0.concepts.numpy()  # the shipped 7-template ensemble, from its cache
    nodes, member = hierarchy(ids, graph)
    node_text = text([TEMPLATE.format(graph[n][0][0]) for n in nodes])

    rows: list[dict] = []

    def row(direction: str, recipe: str, score) -> dict:
        """score(set name) -> [N, K] scores; accuracy on validation and test sets."""
        r = {"direction": direction, "recipe": recipe, **{n: top1(score(n), truth[n]) for n in sets}}
        r["validation"] = float(np.mean([r[n] for n in VALIDATION]))
        rows.append(r)
        print(f"default: {direction}: {recipe}: val {r['validation']:.1f} | "
              + " ".join(f"{n} {r[n]:.1f}" for n in TEST), flush=True)
        return r

    def logits(name, variant="lite0", prep="crop", flip=False):
        return towers.get(variant, prep, name, flip)["logits"]

    def plain(variant="lite0", prep="crop", concepts=baseline_concepts, top_k=10, temperature=1.0, flip=False):
        def score(name):
            z = logits(name, variant, prep)
            if flip:
                z = (z + logits(name, variant, prep, flip=True)) / 2
            return conse(softmax(z, temperature), concepts, top_k) @ labels[name].T
        return score

    base = row("baseline", "lite0, centre crop, T=10, 7-template concepts, cosine", plain())
    for prep in ("whole", "margin1.4"):
        row("preprocessing", {"whole": "whole image squeezed to 224 (no crop)",
                              "margin1.4": "white margin (x1.4), whole image"}[prep], plain(prep=prep))
    row("test-time augmentation", "mean logits of image and mirror image", plain(flip=True))
    for variant in [] if quick else ["lite1", "lite2"]:  # whole image only: a crop pass costs ~15 min more
        row("image tower", f"{variant} at {packaged.RESOLUTION[variant]} px, whole image", plain(variant, "whole"))
    for top_k in (1, 3, 30, 1000):
        row("concepts T", f"T={top_k}", plain(top_k=top_k))
    for temperature in (0.5, 2.0):
        row("ImageNet softmax temperature", f"t={temperature}", plain(temperature=temperature))
    for key, concepts in concept_sets.items():
        row("concept text", f"{key} (1 template)", plain(concepts=concepts))
    for tau in (0.05, 0.1):
        row("matching", f"log-sum-exp over concepts, tau={tau}",
            lambda n, tau=tau: log_sum_exp(softmax(logits(n)), baseline_concepts, labels[n], tau))
    both = np.concatenate([baseline_concepts, node_text])
    row("matching", f"+ {len(nodes)} WordNet inner nodes (summed leaf probabilities), log-sum-exp tau=0.1",
        lambda n: log_sum_exp(np.concatenate([softmax(logits(n)), softmax(logits(n)) @ member], 1), both,
                              labels[n], 0.1))
    row("matching", "hubness: minus each label's mean cosine to the 1,000 concepts",
        lambda n: plain()(n) - (baseline_concepts @ labels[n].T).mean(0))
    linear = devise_on_classifier_rows(lite0.image_model.classifier.weight.detach(), baseline_concepts)
    with torch.no_grad():
        mapped = {n: unit(linear(torch.from_numpy(towers.get("lite0", "crop", n)["feats"])).numpy()) for n in sets}
    row("learned alignment", "DeViSE map trained on the classifier's weight rows", lambda n: mapped[n] @ labels[n].T)
    row("learned alignment", "ConSE + 0.3 x that map",
        lambda n: 0.7 * plain()(n) + 0.3 * mapped[n] @ labels[n].T)

    def conse_of(name):
        return towers.get("lite0", "crop", name)["feats"], conse(softmax(logits(name)), baseline_concepts, 10), truth[name]
    # quick subsets hold too few images per class for the proxy's class halves
    proxy = None if quick else seen_class_map_proxy([conse_of(n) for n in VALIDATION],
                                                    [conse_of(n) for n in TEST[1:]], labels[VALIDATION[0]])

    # The choice, read off this table's validation column: the whole image (+0.9, free) is shipped;
    # lite1 adds 0.7 more on validation at 0.6-0.7x the images/s and needs a second wheel, so it stays an
    # option (packaged:lite1); log-sum-exp matching is not a dot product of embeddings, which the store,
    # FAISS and the adapter need. The shipped default (PackagedBackend()) must be exactly this recipe.
    shipped = towers.model("lite0").preprocess(sets["tuxpaint"].images[0].convert("RGB"))
    if not torch.equal(shipped, PREPROCESSING["whole"](224)(sets["tuxpaint"].images[0].convert("RGB"))):
        raise AssertionError("the packaged default's preprocessing is not the chosen one")
    chosen = plain(prep="whole")
    choice = row("chosen", "lite0, whole image, T=10, 7-template concepts, cosine (the new default)", chosen)

    validation = torch.from_numpy(np.concatenate([chosen(n) for n in VALIDATION]))  # same label set
    scale = metrics.fit_logit_scale(validation, [y for n in VALIDATION for y in truth[n]])

    def ece(name: str, at: float) -> float:
        probs = (torch.from_numpy(chosen(name)) * at).softmax(-1)
        return 100 * metrics.expected_calibration_error(probs, truth[name])
    calibration = {n: {"ece_old": ece(n, OLD_SCALE), "ece_fitted": ece(n, scale),
                       "ece_shipped": ece(n, packaged.LOGIT_SCALE)} for n in sets}
    cost = measure_cost(sets["tuxpaint"], quick)
    results = {"quick": quick, "rows": rows, "baseline": base, "chosen": choice, "fitted_scale": scale,
               "calibration": calibration, "cost": cost, "seen_class_proxy": proxy,
               "images": {n: len(ds) for n, ds in sets.items()},
               "classes": {n: len(ds.classnames) for n, ds in sets.items()}}
    results["checks"] = [
        {"name": f"top-1 x baseline, {n}", "value": f"{choice[n] / base[n]:.2f}x ({base[n]:.1f} -> {choice[n]:.1f})",
         "target": ">= 2x", "met": choice[n] >= 2 * base[n]} for n in TEST]
    results["wall_s"] = time.perf_counter() - start
    results["load_average"] = {"before": load_before, "after": common.load_average()}
    results["markdown"] = markdown(results)
    report.write(NAME, results, results["markdown"])
    return results


def measure_cost(ds: datasets.Dataset, quick: bool) -> dict:
    """images/s of the whole clipzsl path (decode, preprocess, tower, ConSE), median of 3 interleaved runs."""
    images = ds.images[:64 if quick else 256]
    variants = {"lite0, crop": ("lite0", True), "lite0, whole (chosen)": ("lite0", False)}
    if not quick:
        variants |= {"lite1, whole": ("lite1", False), "lite2, whole": ("lite2", False)}
    models = {k: packaged.PackagedBackend(v, crop=c) for k, (v, c) in variants.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for _ in range(3):
        for key, model in models.items():
            t, _ = report.timed(lambda: clipzsl.embed_images(model, images, progress=False), 1)
            times[key] += t
    return {k: len(images) / report.median(v) for k, v in times.items()}


def markdown(r: dict) -> list[str]:
    sizes = ", ".join(f"{n} {r['images'][n]} images / {r['classes'][n]} labels" for n in r["images"])
    lines = [
        "Every choice is made on the **validation** emoji styles (Twemoji, Noto); **test** sets: Tux Paint, "
        "OpenMoji, Fluent 3D, never used to choose. Top-1 %; packaged towers, \"a photo of a {}.\" labels. "
        f"Sizes: {sizes}.",
        "",
        "| direction | recipe | validation | Tux Paint | OpenMoji | Fluent 3D | test mean vs baseline |",
        "|---|---|---|---|---|---|---|",
    ]
    base_mean = np.mean([r["baseline"][n] for n in TEST])
    for row in r["rows"]:
        gain = np.mean([row[n] for n in TEST]) - base_mean
        lines.append(f"| {row['direction']} | {row['recipe']} | {row['validation']:.1f} | "
                     + " | ".join(f"{row[n]:.1f}" for n in TEST) + f" | {gain:+.1f} |")
    p = r["seen_class_proxy"]
    if p:
        lines += [
            "",
            "Proxy for learned alignments (not a candidate: trained on validation-style images of half the emoji "
            f"classes, tested on the held-out styles' other half): plain ConSE {p['zero-shot ConSE']:.1f}% vs "
            f"learned map {p['learned map']:.1f}% top-1 on the unseen half.",
        ]
    lines += [
        "",
        f"Target (issue 6): 2x the lite0 baseline on each test set. The issue's own Tux Paint baseline, "
        f"{ISSUE_BASELINE_TUXPAINT}%, is near the 'whole image' row rather than the centre-crop baseline, so it "
        "was probably measured without the crop; against it the chosen recipe is no gain at all.",
        "",
        f"Calibration of the chosen recipe: label probabilities softmax(scale x cosine); scale fitted on "
        f"validation by NLL: **{r['fitted_scale']:.1f}** (was {OLD_SCALE:g}). "
        "Expected calibration error (15 bins, top-1 confidence), points:",
        "",
        f"| set | ECE at the old scale ({OLD_SCALE:g}) | ECE at the fitted scale | ECE at the shipped scale "
        f"({packaged.LOGIT_SCALE:g}) |",
        "|---|---|---|---|",
        *[f"| {n} | {c['ece_old']:.1f} | {c['ece_fitted']:.1f} | {c['ece_shipped']:.1f} |"
          for n, c in r["calibration"].items()],
        "",
        "Cost, whole clipzsl image path on Tux Paint stamps (decode, preprocess, tower, ConSE), median of 3 "
        "interleaved runs: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in r["cost"].items()) + ".",
    ]
    return lines


def main(argv: list[str] | None = None) -> None:
    report.main(__doc__, NAME, run, f"{QUICK_IMAGES} images per set, lite0 only", argv)


if __name__ == "__main__":
    main()

"""Zero-shot retrieval (`clipzsl eval --protocol retrieval`): the captions reader, recall@k as CLIP_benchmark
computes it (checked against its own code where it is importable), the record and the command."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from clipzsl import evaluation as ev
from clipzsl import load_model
from clipzsl.captions import CaptionedImages
from clipzsl.cli import main
from clipzsl.errors import InputError
from clipzsl.images import embed_images
from clipzsl.metrics import positive_ranks, retrieval_recalls

try:  # CLIP_benchmark's own metric code (pip install clip-benchmark --no-deps: it needs only torch and tqdm)
    from clip_benchmark.metrics import zeroshot_retrieval as clip_benchmark
except ImportError:
    clip_benchmark = None
needs_clip_benchmark = pytest.mark.skipif(clip_benchmark is None, reason="clip_benchmark is not installed: "
                                          "pip install clip-benchmark --no-deps to check against its code")


# ---------------------------------------------------------------- recall@k on hand-made score matrices


def test_recall_on_a_matrix_with_known_answers_and_several_captions_per_image():
    # rows: captions 0, 1 of image 0, caption 2 of image 1, captions 3, 4 of image 2
    scores = torch.tensor([[0.9, 0.1, 0.0],   # finds image 0 first
                           [0.1, 0.5, 0.3],   # image 0 is third
                           [0.2, 0.4, 0.6],   # image 1 is second
                           [0.0, 0.1, 0.7],   # image 2 first
                           [0.8, 0.9, 0.1]])  # image 2 third
    metrics = retrieval_recalls(scores, [0, 0, 1, 2, 2], ks=(1, 2, 3))
    assert metrics["image_retrieval_recall@1"] == pytest.approx(2 / 5)
    assert metrics["image_retrieval_recall@2"] == pytest.approx(3 / 5)
    assert metrics["image_retrieval_recall@3"] == 1.0
    # image 0: its caption 0 (0.9) tops column 0; image 1: its caption 2 (0.4) is behind 0.5 and 0.9;
    # image 2: its caption 3 (0.7) tops column 2
    assert positive_ranks(scores.T, torch.tensor([0, 0, 1, 2, 2])[None] == torch.arange(3)[:, None]).tolist() == [0, 2, 0]
    assert metrics["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert metrics["text_retrieval_recall@3"] == 1.0
    assert list(metrics) == [f"{side}_retrieval_recall@{k}" for k in (1, 2, 3) for side in ("image", "text")]


def test_a_tie_with_a_wrong_candidate_never_counts_as_found():
    constant = torch.ones(4, 4)  # a model that sees nothing: every score the same
    assert set(retrieval_recalls(constant, [0, 1, 2, 3], ks=(1, 3)).values()) == {0.0}
    scores = torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.9, 0.9]])  # each positive ties one negative at the top
    assert positive_ranks(scores, torch.tensor([[True, False, False], [False, False, True]])).tolist() == [1, 1]
    assert positive_ranks(scores, torch.tensor([[True, True, False], [False, True, True]])).tolist() == [0, 0]


def test_recall_at_k_is_none_with_fewer_candidates_than_k_and_a_query_without_positive_is_missed():
    metrics = retrieval_recalls(torch.eye(3), [0, 1, 2], ks=(1, 5))
    assert metrics == {"image_retrieval_recall@1": 1.0, "text_retrieval_recall@1": 1.0,
                       "image_retrieval_recall@5": None, "text_retrieval_recall@5": None}
    assert positive_ranks(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.bool)).tolist() == [3, 3]


def reference_ranks(scores: np.ndarray, positive: np.ndarray) -> list[int]:
    """Per row: where the first positive comes when candidates are sorted by score, negatives first on ties."""
    ranks = []
    for row, pos in zip(scores, positive):
        order = sorted(range(len(row)), key=lambda j: (-row[j], bool(pos[j])))
        ranks.append(next((r for r, j in enumerate(order) if pos[j]), len(row)))
    return ranks


def random_collection(seed: int, images: int, most_captions: int, ties: bool) -> tuple[torch.Tensor, list[int]]:
    """A [texts, images] score matrix (small integers when `ties`) and the image of each caption."""
    rng = np.random.default_rng(seed)
    owner = [i for i in range(images) for _ in range(rng.integers(1, most_captions + 1))]
    shape = (len(owner), images)
    scores = rng.integers(0, 3, shape).astype(np.float32) if ties else rng.standard_normal(shape).astype(np.float32)
    return torch.from_numpy(scores), owner


collections = st.tuples(st.integers(0, 2**32 - 1), st.integers(1, 14), st.integers(1, 4), st.booleans())


@settings(max_examples=60, deadline=None)
@given(collections)
def test_ranks_and_recalls_match_a_sorting_reference_on_random_matrices(collection):
    scores, owner = random_collection(*collection)
    positive = torch.tensor(owner)[:, None] == torch.arange(scores.shape[1])[None]
    assert positive_ranks(scores, positive, chunk=3).tolist() == reference_ranks(scores.numpy(), positive.numpy())
    assert positive_ranks(scores.T, positive.T).tolist() == reference_ranks(scores.T.numpy(), positive.T.numpy())
    by_text = np.array(reference_ranks(scores.numpy(), positive.numpy()))
    metrics = retrieval_recalls(scores, owner, ks=(1, 2))
    assert metrics["image_retrieval_recall@2"] == pytest.approx(np.mean(by_text < 2) if scores.shape[1] >= 2 else None)


# ---------------------------------------------------------------- against CLIP_benchmark's own code


def clip_benchmark_recalls(scores: torch.Tensor, owner: list[int], k: int) -> tuple[float, float]:
    """CLIP_benchmark's image and text retrieval recall@k: its `recall_at_k` over its positive-pair matrix."""
    positive = torch.zeros_like(scores, dtype=torch.bool)
    positive[torch.arange(len(scores)), owner] = True
    image = (clip_benchmark.recall_at_k(scores, positive, k) > 0).float().mean().item()
    text = (clip_benchmark.recall_at_k(scores.T, positive.T, k) > 0).float().mean().item()
    return image, text


@needs_clip_benchmark
@settings(max_examples=60, deadline=None)
@given(collections)
def test_recalls_equal_clip_benchmarks_without_ties_and_never_exceed_them_with_ties(collection):
    scores, owner = random_collection(*collection)
    ours = retrieval_recalls(scores, owner, ks=(1, 3))
    for k in (1, 3):
        if k > scores.shape[1]:
            assert ours[f"image_retrieval_recall@{k}"] is None  # CLIP_benchmark's top-k fails there
            continue
        image, text = clip_benchmark_recalls(scores, owner, k)
        mine = ours[f"image_retrieval_recall@{k}"], ours[f"text_retrieval_recall@{k}"]
        if collection[3]:  # ties: CLIP_benchmark's top-k breaks them either way, ours against the positive
            assert mine[0] <= image + 1e-6 and mine[1] <= text + 1e-6
        else:
            assert mine == pytest.approx((image, text), abs=1e-7)


class LookupModel(torch.nn.Module):
    """A CLIP-like model for CLIP_benchmark's `evaluate`: an image is its embedding, a token a caption's index."""

    def __init__(self, text_embeddings: torch.Tensor):
        super().__init__()
        self.texts = text_embeddings

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return images

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.texts[tokens]


@needs_clip_benchmark
def test_the_record_metrics_are_clip_benchmarks_evaluate_on_the_same_embeddings():
    rng = np.random.default_rng(3)
    images = torch.from_numpy(rng.standard_normal((23, 16)).astype(np.float32))
    captions = [[str(t) for t in range(n, n + rng.integers(1, 4))] for n in range(0, 23 * 4, 4)]
    owner = [i for i, per_image in enumerate(captions) for _ in per_image]
    texts = torch.from_numpy(rng.standard_normal((23 * 4, 16)).astype(np.float32))
    batches = [(images[s:s + 8], captions[s:s + 8]) for s in range(0, 23, 8)]
    expected = clip_benchmark.evaluate(LookupModel(texts), batches, lambda t: torch.tensor([int(x) for x in t]),
                                       "cpu", amp=False, recall_k_list=[1, 5, 10])
    used = torch.tensor([int(t) for per_image in captions for t in per_image])
    scores = F.normalize(texts[used], dim=-1) @ F.normalize(images, dim=-1).T
    assert retrieval_recalls(scores, owner) == expected  # the same keys, in the same order, the same values
    assert 0 < expected["image_retrieval_recall@5"] < 1


# ---------------------------------------------------------------- the captions reader


def write_images(root, names, seed=0):
    """Small noisy PNGs under root, one per name (sub-folders allowed)."""
    rng = np.random.default_rng(seed)
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(root / name)
    return root


def test_csv_jsonl_and_sidecar_captions_read_to_the_same_collection(tmp_path):
    data = write_images(tmp_path / "data", ["a.png", "sub/b.png"])
    (tmp_path / "c.csv").write_text('\ufeffimage,caption,source\na.png,a red  car,x\nsub/b.png,"a dog, running",y\n'
                                    "a.png,a car\n", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"image": "a.png", "captions": ["a red car", "a car"]}\n\n'
                                      '{"image": "sub/b.png", "caption": "a dog, running"}\n', encoding="utf-8")
    (data / "a.txt").write_text("a red car\n\na car\n", encoding="utf-8")
    (data / "sub/b.txt").write_text("a dog, running", encoding="utf-8")
    read = [CaptionedImages.read(data, tmp_path / "c.csv"), CaptionedImages.read(data, tmp_path / "c.jsonl"),
            CaptionedImages.read(data)]
    for collection in read:
        assert collection.paths == [str(data / "a.png"), str(data / "sub/b.png")]
        assert collection.captions == [["a red car", "a car"], ["a dog, running"]]
        assert collection.texts == ["a red car", "a car", "a dog, running"] and collection.text_image == [0, 0, 1]
    assert read[0].subset([str(data / "sub/b.png")]).captions == [["a dog, running"]]


def test_images_a_captions_file_does_not_name_are_left_out_with_a_notice(tmp_path, caplog):
    data = write_images(tmp_path / "data", ["a.png", "b.png", "c.png"])
    (tmp_path / "c.csv").write_text("image,caption\nb.png,a dog\n", encoding="utf-8")
    with caplog.at_level("INFO", logger="clipzsl"):
        collection = CaptionedImages.read(data, tmp_path / "c.csv")
    assert collection.paths == [str(data / "b.png")]
    assert f"2 images under {data} have no caption in {tmp_path / 'c.csv'} and are not evaluated" in caplog.text


@pytest.mark.parametrize("name, content, message", [
    ("c.csv", "image,caption\na.png,a car\nmissing.png,a cat\n",
     r"c.csv:3: image 'missing.png' is not a file under .*; fix the path .* or remove the line"),
    ("c.csv", "image,caption\na.png,  \n", r"c.csv:2: the caption of 'a.png' is empty; write one or remove the line"),
    ("c.csv", "path,text\na.png,a car\n", r"c.csv:1: the header row is \['path', 'text'\]; .*image,caption"),
    ("c.csv", "image,caption\na.png\n", r"c.csv:2: fewer columns than the header's"),
    ("c.csv", "image,caption\n", r"c.csv: no captioned image"),
    ("c.jsonl", '{"image": "a.png", "caption": "x"}\n{"image": "a.png"\n', r"c.jsonl:2: not JSON"),
    ("c.jsonl", '{"image": "a.png", "caption": "x", "captions": ["y"]}\n', r'c.jsonl:1: give either .* not both'),
    ("c.jsonl", '{"image": "a.png", "captions": []}\n', r'c.jsonl:1: "captions" must be a list of strings'),
    ("c.jsonl", '["a.png", "x"]\n', r'c.jsonl:1: not an object with an "image" path'),
    ("c.json", "[]", r"c.json: captions are read from .csv, .jsonl, .ndjson files"),
])
def test_a_wrong_captions_file_is_refused_naming_the_line_and_the_fix(tmp_path, name, content, message):
    data = write_images(tmp_path / "data", ["a.png"])
    (tmp_path / name).write_text(content, encoding="utf-8")
    with pytest.raises(InputError, match=message):
        CaptionedImages.read(data, tmp_path / name)


def test_sidecar_captions_refuse_an_image_without_captions_and_captions_without_an_image(tmp_path):
    data = write_images(tmp_path / "data", ["a.png", "b.png"])
    (data / "a.txt").write_text("a car\n")
    with pytest.raises(InputError, match=r"b.png: no caption file b.txt beside it"):
        CaptionedImages.read(data)
    (data / "b.txt").write_text("\n \n")
    with pytest.raises(InputError, match=r"b.txt: no caption in it"):
        CaptionedImages.read(data)
    (data / "b.txt").write_text("a dog\n")
    (data / "notes.txt").write_text("about these images\n")
    with pytest.raises(InputError, match=r"notes.txt: a caption file without an image of the same name"):
        CaptionedImages.read(data)
    with pytest.raises(InputError, match="not a folder"):
        CaptionedImages.read(data / "a.png")


# ---------------------------------------------------------------- the record and the command


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("CLIPZSL_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def captioned(tmp_path, count=12):
    data = write_images(tmp_path / "data", [f"{i}.png" for i in range(count)])
    words = ["red", "green", "blue", "cat", "dog", "car", "tree", "sky", "sun", "boat", "house", "fish"]
    lines = [json.dumps({"image": f"{i}.png", "captions": [f"a {words[i]}", f"a photo of a {words[i]}"][: 1 + i % 2]})
             for i in range(count)]
    (tmp_path / "captions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return data, tmp_path / "captions.jsonl"


def test_retrieval_evaluation_scores_every_caption_against_every_image(tmp_path, tiny_clip, cache_dir):
    data, captions = captioned(tmp_path)
    model = load_model(f"hf:{tiny_clip}")
    collection = CaptionedImages.read(data, captions)
    record = ev.retrieval_evaluation(collection, model, batch_size=5)
    assert {k: record[k] for k in ("dataset", "model", "pretrained", "task", "language")} == {
        "dataset": str(data), "model": f"hf:{tiny_clip}", "pretrained": model.fingerprint,
        "task": "zeroshot_retrieval", "language": "en"}
    assert (record["n_images"], record["n_captions"], record["n_unreadable"]) == (12, 18, 0)
    images = embed_images(model, collection.paths).embeddings
    texts = torch.cat([model.encode_texts([t]) for t in collection.texts])  # one at a time, no padding
    expected = retrieval_recalls(texts @ images.T, collection.text_image)
    assert record["metrics"] == pytest.approx(expected, abs=1e-6)
    assert 0 < expected["image_retrieval_recall@1"] < 1  # a random model: not trivial either way


def test_eval_retrieval_writes_the_record_and_exits_1_when_an_image_is_left_out(tmp_path, tiny_clip, cache_dir,
                                                                                capsys):
    data, captions = captioned(tmp_path)
    out = tmp_path / "r.json"
    command = ["eval", str(data), "--protocol", "retrieval", "--captions", str(captions), "--model",
               f"hf:{tiny_clip}", "--output", str(out)]
    assert main(command) == 0
    printed = capsys.readouterr().out
    record = json.loads(out.read_text())
    assert printed == ev.format_record(record) and record["task"] == "zeroshot_retrieval"
    assert printed.splitlines()[0] == f"zero-shot retrieval: {data}, 12 images, 18 captions, model hf:{tiny_clip}"
    (data / "3.png").write_bytes(b"not a png")  # caption 'a photo of a cat' has no image to find any more
    assert main(command) == 1
    left = json.loads(out.read_text())
    assert (left["n_images"], left["n_captions"], left["n_unreadable"]) == (11, 16, 1)


def test_eval_retrieval_refuses_a_wrong_collection_before_loading_a_model(tmp_path, capsys):
    data, captions = captioned(tmp_path)
    (data / "5.png").unlink()
    assert main(["eval", str(data), "--protocol", "retrieval", "--captions", str(captions),
                 "--model", "hf:/no/such/model"]) == 2
    assert "captions.jsonl:6: image '5.png' is not a file under" in capsys.readouterr().err
    assert main(["eval", str(data), "--protocol", "zeroshot", "--captions", str(captions)]) == 2
    assert "--captions applies to --protocol retrieval only" in capsys.readouterr().err
    assert main(["eval", str(data), "--protocol", "retrieval", "--save-classifier", str(tmp_path / "c")]) == 2
    assert "apply to --protocol zeroshot only" in capsys.readouterr().err

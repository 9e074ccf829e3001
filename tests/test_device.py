"""Device, precision and the uint8 input pipeline (issue 13).

Real images: every colour photo shipped inside installed packages (scikit-image's data directory,
scikit-learn's two sample photos, matplotlib's grace_hopper.jpg), each whole and as its four
quadrant crops, so the tests run offline. CUDA tests are skipped without a GPU.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clipzsl
from clipzsl.backends.base import resolve_device, resolve_precision
from clipzsl.cli import main
from clipzsl.images import embed_images, load_image
from clipzsl.store import EmbeddingStore

SITE = Path(np.__file__).parents[1]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def photo_files() -> list[Path]:
    files = sorted((SITE / "skimage" / "data").glob("*.png")) + sorted((SITE / "skimage" / "data").glob("*.jpg"))
    files += [SITE / "sklearn/datasets/images/china.jpg", SITE / "sklearn/datasets/images/flower.jpg",
              SITE / "matplotlib/mpl-data/sample_data/grace_hopper.jpg"]
    return [f for f in files if f.is_file()]


def real_images(crops: bool = True) -> list:
    images = []
    for path in photo_files():
        image = load_image(path)
        w, h = image.size
        images.append(image)
        if crops:
            images += [image.crop(box) for box in
                       ((0, 0, w // 2, h // 2), (w // 2, 0, w, h // 2), (0, h // 2, w // 2, h), (w // 2, h // 2, w, h))]
    return images


@pytest.fixture(scope="module")
def openclip_spec():
    return "openclip:ViT-B-32/random"


def seeded(spec: str, **kwargs) -> clipzsl.Backend:
    """A model load with fixed random init (openclip random weights are drawn at load)."""
    torch.manual_seed(0)
    return clipzsl.load_model(spec, **kwargs)


@pytest.mark.parametrize("kind", ["openclip", "hf", "packaged"])
def test_uint8_workers_plus_device_normalisation_equal_the_float_preprocessing(kind, tiny_clip, openclip_spec):
    """Workers hand over uint8 and the device normalises: the same pixels and embeddings as the
    backend's own float preprocessing, for all three backends."""
    spec = {"openclip": openclip_spec, "hf": f"hf:{tiny_clip}", "packaged": "packaged"}[kind]
    model = seeded(spec, device="cpu")
    images = real_images(crops=False)[:6]
    uint8 = [model.pixels_uint8(image) for image in images]
    assert all(t.dtype == torch.uint8 for t in uint8)
    reference = torch.stack([model.preprocess(image) for image in images])
    pixels = model.normalize_pixels(torch.stack(uint8))
    assert (pixels - reference).abs().max() <= 1e-6
    via_pipeline = embed_images(model, images, batch_size=4).embeddings
    direct = model.encode_images(reference)
    assert (via_pipeline - direct).abs().max() <= 1e-5


@pytest.mark.parametrize("kind", ["openclip", "hf", "packaged"])
def test_fingerprint_is_the_weights_not_device_or_precision(kind, tiny_clip, openclip_spec):
    spec = {"openclip": openclip_spec, "hf": f"hf:{tiny_clip}", "packaged": "packaged"}[kind]
    fp32, bf16 = seeded(spec, device="cpu", precision="fp32"), seeded(spec, device="auto", precision="bf16")
    assert (fp32.precision, bf16.precision) == ("fp32", "bf16")
    assert fp32.fingerprint == bf16.fingerprint


def test_auto_choices_and_clear_refusals(monkeypatch):
    if not torch.cuda.is_available():
        assert resolve_device("auto") in ("cpu", "mps")
        with pytest.raises(ValueError, match="no CUDA GPU; use --device cpu"):
            resolve_device("cuda")
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(ValueError, match="fp16 needs a GPU"):
        resolve_precision("fp16", "cpu")
    with pytest.raises(ValueError, match="unknown device 'gpu0'"):
        resolve_device("gpu0")
    with pytest.raises(ValueError, match="unknown precision 'int8'"):
        clipzsl.load_model("packaged", precision="int8")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert resolve_device("auto") == "cuda" and resolve_precision("auto", "cuda") == "fp16"


def test_bf16_outputs_come_back_float32_on_the_cpu(tiny_clip):
    model = clipzsl.load_model(f"hf:{tiny_clip}", device="cpu", precision="bf16")
    embedded = embed_images(model, real_images(crops=False)[:3], return_tokens=True)
    prompts = clipzsl.encode_prompts(model, ["a cat", "a dog", "a cat"])
    for tensor in (embedded.embeddings, embedded.tokens, prompts):
        assert tensor.dtype == torch.float32 and tensor.device.type == "cpu"


def agreement(spec: str, labels: str) -> tuple[float, float, float]:
    """(share of equal top-1 labels, min image cosine, min class-embedding cosine) of bf16 against fp32
    on the real images. Both runs score against one set of class embeddings, as they would through
    the label cache (one vector per key, whichever precision wrote it)."""
    images = real_images()
    fp32, bf16 = seeded(spec, device="cpu", precision="fp32"), seeded(spec, device="cpu", precision="bf16")
    a, b = embed_images(fp32, images).embeddings, embed_images(bf16, images).embeddings
    classes = [clipzsl.ZeroShotClassifier(m, labels=labels, cache=False).class_embeddings for m in (fp32, bf16)]
    same = ((a @ classes[0].T).argmax(1) == (b @ classes[0].T).argmax(1)).float().mean().item()
    return same, (a * b).sum(1).min().item(), (classes[0] * classes[1]).sum(1).min().item()


def test_bf16_on_cpu_agrees_with_fp32_openclip(openclip_spec):
    """ViT-B/32 (random weights: open_clip's architecture and numerics; no trained weights offline)."""
    same, worst, worst_class = agreement(openclip_spec, "cifar100")
    assert same >= 0.99 and worst >= 0.999 and worst_class >= 0.999, (same, worst, worst_class)


def test_bf16_on_cpu_agrees_with_fp32_packaged():
    """bf16 runs the text tower; the EfficientNet stays fp32 (in bf16 it reached only 0.95 / 0.972)."""
    same, worst, worst_class = agreement("packaged", "cifar100")
    assert same >= 0.99 and worst >= 0.999 and worst_class >= 0.999, (same, worst, worst_class)


def test_label_store_notes_the_precisions_that_wrote_it(tiny_clip, tmp_path):
    for precision in ("bf16", "fp32"):
        model = clipzsl.load_model(f"hf:{tiny_clip}", device="cpu", precision=precision)
        clipzsl.ZeroShotClassifier(model, labels=["cat", "dog", f"{precision} bird"], cache=tmp_path)
        store = EmbeddingStore.for_labels(model, tmp_path)
        assert precision in EmbeddingStore.read_meta(store.directory)["precisions"]
    assert EmbeddingStore.read_meta(store.directory)["precisions"] == ["bf16", "fp32"]


def test_decode_on_device_path_runs_on_the_cpu_and_names_bad_files(openclip_spec, tiny_clip, tmp_path):
    """decode="device" (nvJPEG on CUDA) through torchvision's decoder on the CPU: JPEGs decoded and
    resized as tensors come close to Pillow's; a PNG goes through Pillow; a corrupt JPEG is named."""
    model = seeded(openclip_spec, device="cpu")
    files = []
    for i, image in enumerate(real_images(crops=False)[:4]):
        files.append(tmp_path / f"{i}.jpg")
        image.save(files[-1], quality=95)
    real_images(crops=False)[4].save(tmp_path / "p.png")
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\0" * 64)
    sources = [str(f) for f in files] + [str(tmp_path / "p.png"), str(tmp_path / "bad.jpg")]
    pillow = embed_images(model, sources, skip_errors=True)
    device = embed_images(model, sources, skip_errors=True, decode="device")
    assert device.sources == pillow.sources and len(device) == 5
    assert [f.source for f in device.failures] == [str(tmp_path / "bad.jpg")]
    assert (device.embeddings * pillow.embeddings).sum(1).min() >= 0.99
    hf = clipzsl.load_model(f"hf:{tiny_clip}", device="cpu")
    with pytest.raises(ValueError, match="decode='device' needs a fixed resize/crop"):
        embed_images(hf, sources, decode="device")


COMMANDS = {
    "classify": lambda d, spec: ["classify", str(d / "imgs"), "--labels", "a,b", "--model", spec, "--no-cache"],
    "index": lambda d, spec: ["index", "images", str(d / "imgs"), "--out", str(d / "idx"), "--model", spec],
    "embed": lambda d, spec: ["embed", str(d / "imgs"), "--out", str(d / "shards"), "--model", spec],
    "eval": lambda d, spec: ["eval", str(d / "data"), "--protocol", "zeroshot", "--model", spec,
                             "--cache-dir", str(d / "cache")],
    "train-adapter": lambda d, spec: ["train-adapter", str(d / "data"), "--out", str(d / "ad"), "--model", spec,
                                      "--epochs", "1", "--cache-dir", str(d / "cache")],
    "explain": lambda d, spec: ["explain", str(d / "imgs"), "--labels", "a,b", "--model", spec,
                                "--out", str(d / "ex")],
}


@pytest.fixture
def folders(tmp_path):
    images = real_images(crops=False)[:4]
    (tmp_path / "imgs").mkdir()
    for i, image in enumerate(images[:3]):
        image.save(tmp_path / "imgs" / f"{i}.png")
    for c, name in enumerate(("cat", "dog")):
        (tmp_path / "data" / name).mkdir(parents=True)
        for i in range(2):
            images[(c + i) % 4].save(tmp_path / "data" / name / f"{i}.png")
    return tmp_path


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_model_command_takes_device_precision_batch_size_and_workers(command, folders, tiny_clip,
                                                                           monkeypatch):
    from clipzsl.backends.hf import HFBackend

    seen = []
    encode = HFBackend.encode_images

    def spy(self, pixels, return_tokens=False):
        seen.append((self.device, self.precision, pixels.shape[0], self.workers))
        return encode(self, pixels, return_tokens)

    monkeypatch.setattr(HFBackend, "encode_images", spy)
    argv = COMMANDS[command](folders, f"hf:{tiny_clip}")
    status = main([*argv, "--device", "cpu", "--precision", "bf16", "--batch-size", "2", "--workers", "3"])
    # train-adapter exits 1 when no epoch beat the untrained adapter, as a random tiny model may well not
    untrained = command == "train-adapter" and json.loads((folders / "ad" / "adapter.json").read_text())["training"][
        "untrained"]
    assert status == (1 if untrained else 0)
    assert seen and all(s[:2] == ("cpu", "bf16") and s[2] <= 2 for s in seen)
    if command not in ("classify", "index"):  # these two pass --workers per call, not to the model
        assert all(s[3] == 3 for s in seen)


def test_search_takes_the_options_and_refuses_a_missing_gpu(folders, tiny_clip, capsys):
    assert main(COMMANDS["index"](folders, f"hf:{tiny_clip}")) == 0
    assert main(["search", str(folders / "idx"), "a cat", "--device", "cpu", "--precision", "bf16"]) == 0
    meta = json.loads((folders / "idx" / "meta.json").read_text())
    assert meta["precisions"] == ["fp32"]
    if not torch.cuda.is_available():
        capsys.readouterr()
        assert main(["search", str(folders / "idx"), "a cat", "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("clipzsl: error: device 'cuda'") and err.count("\n") == 1


# -- on a CUDA GPU ----------------------------------------------------------------------------------------

@CUDA
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("kind", ["openclip", "hf"])
def test_cuda_agrees_with_cpu_fp32(kind, precision, tiny_clip, openclip_spec):
    spec = {"openclip": openclip_spec, "hf": f"hf:{tiny_clip}"}[kind]
    cpu, gpu = seeded(spec, device="cpu"), seeded(spec, device="cuda", precision=precision)
    assert gpu.fingerprint == cpu.fingerprint
    images = real_images()
    a, b = embed_images(cpu, images).embeddings, embed_images(gpu, images).embeddings
    assert b.device.type == "cpu" and b.dtype == torch.float32
    assert (a * b).sum(1).min() >= (0.9999 if precision == "fp32" else 0.999)
    texts = clipzsl.encode_prompts(gpu, ["a cat", "a dog", "a cat"])  # once wrote device output into a CPU buffer
    assert texts.device.type == "cpu" and (texts - clipzsl.encode_prompts(cpu, ["a cat", "a dog", "a cat"])).abs().max() < 0.05


@CUDA
def test_cuda_index_search_and_device_decode(folders, openclip_spec):
    model = seeded(openclip_spec, device="cuda")
    index = clipzsl.ImageIndex(folders / "idx", model)
    index.update(folders / "imgs")
    assert len(index.search("a cat", top_k=2)) == 2  # once called .numpy() on a CUDA tensor
    assert len(index.search(torch.randn(model.embed_dim, device="cuda"), top_k=1)) == 1
    jpeg = folders / "x.jpg"
    real_images(crops=False)[0].save(jpeg, quality=95)
    on_gpu = embed_images(model, [str(jpeg)], decode="device").embeddings
    on_cpu = embed_images(model, [str(jpeg)]).embeddings
    assert (on_gpu * on_cpu).sum() >= 0.99


@CUDA
@pytest.mark.parametrize("command", list(COMMANDS))
def test_cuda_every_command(command, folders, tiny_clip):
    assert main([*COMMANDS[command](folders, f"hf:{tiny_clip}"), "--device", "cuda"]) == 0

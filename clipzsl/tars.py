"""webdataset `.tar` shards as image input (what img2dataset writes): each image member is named
`SHARD.tar/MEMBER`, listed first (`tar_members`: its header says where it is) and decoded when its turn
comes (`load_sources`, each .tar opened once). `clipzsl embed` (`shards.image_sources`), `clipzsl index
images` (`ImageIndex.update`) and the Ray engine read them through here.
"""
from __future__ import annotations

import io
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence, Union

from PIL import Image

from .errors import InputError
from .images import IMAGE_SUFFIXES, EmbeddedImages, ImageLoadError, load_image, source_name


@dataclass(frozen=True)
class TarMember:
    """An image inside a webdataset .tar shard, listed but not yet read (its header says where it is)."""

    tar: Path
    info: tarfile.TarInfo


#: what an image is named by before it is read: a file path, a .tar member, or why it cannot be read
ImageSourceItem = Union[str, TarMember, ImageLoadError]


def is_tar(path: str | Path) -> bool:
    """Whether an input names a webdataset shard (a `.tar` file)."""
    return Path(path).suffix == ".tar" and Path(path).is_file()


def tar_members(path: Path) -> Iterator[tuple[str, TarMember]]:
    """(SHARD.tar/MEMBER, its member) for every image file in the shard, in the shard's order; a file that is
    not a readable tar is an InputError naming it."""
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and Path(member.name).suffix.lower() in IMAGE_SUFFIXES:
                    yield f"{path}/{member.name}", TarMember(path, member)
    except tarfile.TarError as err:
        raise InputError(f"{path}: not a readable webdataset .tar shard ({err})") from err


def load_sources(items: Sequence[tuple[str, ImageSourceItem]]) -> list[str | Image.Image | ImageLoadError]:
    """Each item's image as `embed_images` takes it: a path stays a path, a .tar member is decoded (each
    .tar opened once), an unreadable one is its `ImageLoadError`."""
    tars: dict[Path, tarfile.TarFile] = {}
    try:
        return [_member_image(name, source, tars) if isinstance(source, TarMember) else source
                for name, source in items]
    finally:
        for tar in tars.values():
            tar.close()


def _member_image(name: str, member: TarMember, tars: dict[Path, tarfile.TarFile]) -> Image.Image | ImageLoadError:
    try:
        tar = tars.get(member.tar) or tars.setdefault(member.tar, tarfile.open(member.tar))
        data = tar.extractfile(member.info)
        with Image.open(io.BytesIO(data.read() if data is not None else b"")) as image:
            return load_image(image)
    except (OSError, SyntaxError, ValueError, tarfile.TarError) as err:
        return ImageLoadError(name, f"corrupt or truncated image ({err})")


def member_bytes(tar: str | Path, offset: int, size: int) -> bytes:
    """The data of the member of the shard `tar` whose data starts at `offset` (its `TarInfo.offset_data`) and
    is `size` bytes long: what a Ray decoding task reads, given those numbers rather than the member."""
    info = tarfile.TarInfo("member")
    info.offset_data, info.size = offset, size
    with tarfile.open(tar) as shard:
        data = shard.extractfile(info)
        return data.read() if data is not None else b""


def embed_named(items: Sequence[tuple[str, ImageSourceItem]], embed: Callable[..., EmbeddedImages],
                **options) -> EmbeddedImages:
    """`embed(images, skip_errors=True, **options)` of the items' images (`load_sources`), its rows and
    failures named by the items' names (a decoded .tar member's, not `<image i>`), the items that could
    not even be read among the failures."""
    loaded = load_sources(items)
    todo = [(name, s) for (name, _), s in zip(items, loaded) if not isinstance(s, ImageLoadError)]
    embedded = embed([s for _, s in todo], skip_errors=True, **options)
    name_of = {source_name(s, i): name for i, (name, s) in enumerate(todo)}
    failures = [ImageLoadError(name_of.get(f.source, f.source), f.reason) for f in embedded.failures]
    return EmbeddedImages(embedded.embeddings, embedded.tokens, [name_of[s] for s in embedded.sources],
                          failures + [s for s in loaded if isinstance(s, ImageLoadError)])

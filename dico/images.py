"""Image files: finding them under a folder, opening one with an error that names it, and decoding
many for a CLIP model.

`ImageFiles` is the one dataset every image path of the pipeline goes through (grid features,
image embeddings for `cache_embeddings`, `evaluate` and `dico score`): each item is decoded and
preprocessed in a DataLoader worker, and a file that will not decode comes back as its error message
instead of an exception, so the consumer can name it (a worker's exception would arrive wrapped in
a traceback) or, where asked to, skip and count it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


# the image files a folder search picks up (any case: IMG_001.JPG too)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_image_file(path: str | Path) -> bool:
    """An existing file with one of IMAGE_EXTENSIONS."""
    path = Path(path)
    return path.suffix.lower() in IMAGE_EXTENSIONS and path.is_file()


def image_files(root: str | Path) -> list[Path]:
    """Every image file under the folder `root`, at any depth, sorted by path (the one folder search of
    `dico score --images` and `dico caption`)."""
    return [p for p in sorted(Path(root).rglob("*")) if is_image_file(p)]


# what to do about an image that will not decode, in the pipeline (a command says its own option)
PIPELINE_HINT = "replace the file, or set features.skip_broken_images: true to skip and count such images"


def load_image(path: str | Path, split: str | None = None, draft_size: int | None = None, hint: str = PIPELINE_HINT):
    """Open an image as RGB, with an error that names the file (and split) when it is broken, and
    `hint`: what to do about it.

    `draft_size`: let libjpeg decode a JPEG at 1/2, 1/4 or 1/8 scale in the DCT domain, as small as
    keeps both sides >= draft_size (PIL `Image.draft`); other formats ignore it."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    where = f" (split {split!r})" if split else ""
    try:
        with Image.open(path) as im:
            if draft_size:
                im.draft("RGB", (draft_size, draft_size))
            return im.convert("RGB")
    except FileNotFoundError:
        raise FileNotFoundError(f"image {path}{where} does not exist; check data.image_root in the "
                                "config or rerun the download/demo step") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"image {path}{where} cannot be decoded ({e}); {hint}") from None


class ImageFiles:
    """Item i: (pixels [3, size, size], i, error): `preprocess` of image i and None, or zeros and the
    error (from `load_image`: it names the file) that kept it from decoding. Batch with `collate`.
    A map-style dataset for torch's DataLoader (which needs only __len__ and __getitem__): torch is
    imported where it is used, so the folder search above serves the data step, whose env has no torch."""

    def __init__(self, paths, preprocess, size: int, split: str | None = None, draft_size: int | None = None,
                 hint: str = PIPELINE_HINT):
        self.paths, self.preprocess, self.size = list(paths), preprocess, size
        self.split, self.draft_size, self.hint = split, draft_size, hint

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        try:
            return self.preprocess(load_image(self.paths[i], self.split, self.draft_size, self.hint)), i, None
        except (OSError, ValueError) as e:
            import torch

            return torch.zeros(3, self.size, self.size), i, e


def collate(items) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list]:
    """`ImageFiles` items -> (pixels [B, 3, S, S], decoded? [B] bool, indices [B], errors: None or the
    exception of each item)."""
    import torch

    errors = [e for _, _, e in items]
    return (torch.stack([x for x, _, _ in items]), torch.tensor([e is None for e in errors]),
            torch.tensor([i for _, i, _ in items]), errors)

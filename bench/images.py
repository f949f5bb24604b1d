"""COCO-like JPEGs for the feature benchmarks, and the decode paths they compare.

`write_jpegs` writes 640x480 RGB JPEGs (quality 90, 4:2:0 chroma, like most COCO files) that look
roughly natural to a JPEG decoder: smooth multi-scale colour noise (sky, walls, ground), a handful
of flat and textured shapes with hard edges (objects), and fine grain (sensor noise), so the files
are ~100-200 KB like COCO's (mean ~160 KB) and decode at the same speed per pixel.

Decode paths (all end as CLIP's test transform: bicubic resize of the short side to `size`, centre
crop, RGB):
- `load_full`:  decode at full size, then resize (what dico.images.load_image + clip_preprocess do);
- `load_draft`: PIL `Image.draft('RGB', (size, size))` first: libjpeg decodes at 1/2, 1/4 or 1/8
  scale in the DCT domain (the largest reduction that keeps both sides >= size), so a 640x480 COCO
  image is decoded at 320x240 (a quarter of the pixels) and the bicubic resize has 4x less input.
  The pixels differ slightly from a full decode (`draft_pixel_error` measures by how much).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

COCO_SIZE = (640, 480)


def coco_like_image(seed: int, size: tuple[int, int] = COCO_SIZE):
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    w, h = size

    def field(gw, gh, channels):  # smooth noise: a coarse random grid, bicubic-upsampled
        low = rng.normal(0.0, 1.0, (gh, gw, channels)).astype(np.float32)
        return np.stack([np.asarray(Image.fromarray(low[:, :, c], mode="F").resize((w, h), Image.BICUBIC))
                         for c in range(channels)], axis=2)

    img = np.zeros((h, w, 3), np.float32)
    for (gw, gh), luma, chroma in (((4, 3), 45.0, 25.0), ((16, 12), 25.0, 10.0), ((80, 60), 18.0, 4.0),
                                   ((320, 240), 24.0, 3.0)):  # scenery to texture, mostly luminance
        img += luma * field(gw, gh, 1) + chroma * field(gw, gh, 3)
    img += rng.uniform(70, 180) + rng.uniform(-25, 25, 3)
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(im)
    for _ in range(rng.integers(3, 9)):  # objects with hard edges
        x0, y0 = rng.integers(0, w - 40), rng.integers(0, h - 40)
        x1, y1 = x0 + rng.integers(30, w // 2), y0 + rng.integers(30, h // 2)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = rng.integers(0, 3)
        if kind == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour, outline=(0, 0, 0), width=int(rng.integers(0, 4)))
        elif kind == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            pts = [(int(x0 + rng.integers(0, x1 - x0)), int(y0 + rng.integers(0, y1 - y0))) for _ in range(5)]
            draw.polygon(pts, fill=colour)
    im = im.filter(ImageFilter.GaussianBlur(0.7))  # optics: no perfectly sharp edges
    grain = rng.normal(0.0, 6.0, (h, w, 1)) + rng.normal(0.0, 1.5, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, np.float32) + grain, 0, 255).astype(np.uint8), "RGB")


def _write_one(args):
    path, seed = args
    coco_like_image(seed).save(path, "JPEG", quality=90)
    return path.stat().st_size


def write_jpegs(out_dir: str | Path, n: int, seed: int = 0, workers: int = 1) -> list[Path]:
    """n JPEGs `img_00000.jpg`... in out_dir (written in parallel with `workers` processes)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    jobs = [(out_dir / f"img_{i:05d}.jpg", seed * 1_000_003 + i) for i in range(n)]
    if workers > 1:
        from multiprocessing import get_context

        with get_context("fork").Pool(workers) as pool:
            pool.map(_write_one, jobs, chunksize=16)
    else:
        for job in jobs:
            _write_one(job)
    return [p for p, _ in jobs]


def mean_file_kb(paths) -> float:
    return float(np.mean([Path(p).stat().st_size for p in paths])) / 1024


def _resize_crop(im, size: int):
    """CLIP's geometry on a PIL image: bicubic short side -> size (PIL's antialiased resize, which is
    what torchvision's resize does for PIL input), then a centre crop (torchvision's rounding)."""
    from PIL import Image

    w, h = im.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    im = im.resize((nw, nh), Image.BICUBIC)
    left, top = int(round((nw - size) / 2.0)), int(round((nh - size) / 2.0))
    return im.crop((left, top, left + size, top + size))


def load_full(path, size: int):
    """Full decode, then CLIP geometry: PIL RGB image size x size."""
    from PIL import Image

    with Image.open(path) as im:
        return _resize_crop(im.convert("RGB"), size)


def load_draft(path, size: int):
    """DCT-domain reduced decode (PIL draft), then CLIP geometry: PIL RGB image size x size."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # a no-op for non-JPEGs and for JPEGs smaller than 2*size
        return _resize_crop(im.convert("RGB"), size)


def to_uint8_chw(im):
    """PIL RGB -> uint8 tensor [3, H, W]; normalisation ((x/255 - mean)/std) happens on the GPU."""
    import torch

    return torch.from_numpy(np.asarray(im, dtype=np.uint8).copy()).permute(2, 0, 1)


def draft_pixel_error(paths, size: int = 224) -> tuple[float, float]:
    """Mean and max |pixel difference| (0-255 scale) of draft vs full decode over `paths`."""
    diffs = [np.abs(np.asarray(load_draft(p, size), np.int16) - np.asarray(load_full(p, size), np.int16))
             for p in paths]
    return float(np.mean([d.mean() for d in diffs])), float(max(d.max() for d in diffs))

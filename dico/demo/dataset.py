"""The demo data set: images of generated scenes with five captions each, in the Karpathy schema.

Nothing real (COCO, CLIP weights) can be shipped or downloaded in tests, so the demo generates a
small captioning data set that exercises every code path of the paper's pipeline: JPEG files (the
real decoding path), five varied references per image (`captions`), and a Karpathy-format split file
with the same schema as COCO's `dataset_coco.json`, each image also carrying its `scene` (what it
shows, for `language.describes`). Deterministic from a seed: the same seed gives byte-identical
JPEGs and captions.
"""
from __future__ import annotations

import random
from pathlib import Path

from PIL import Image

from ..io import atomic_path, read_json, write_json
from .captions import captions
from .language import grammatical
from .scenes import VARIANTS, Scene, random_scene, render, scene_from_json, scene_json

JPEG_QUALITY = 90  # of the demo files; the in-memory pretraining scenes go through the same round trip


def make_demo_data(out_dir: str | Path, n_train: int, n_val: int, n_test: int, image_size: int,
                   seed: int, refs_per_image: int = 5, jpeg_quality: int = JPEG_QUALITY, variant: str | None = None) -> Path:
    """Write `out_dir/images/{split}/NNNNNN.jpg` and `out_dir/dataset_demo.json` (Karpathy schema).

    Returns the path of the split file. The JSON is written last, so its presence means the images
    are complete. `variant` ("backgrounds" / "colours"): the out-of-domain palettes (module docstring).
    """
    from tqdm import tqdm

    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r} (one of: {', '.join(v for v in VARIANTS if v)})")
    colours, backgrounds = VARIANTS[variant]
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    images, sentid = [], 0
    plan = [("train", n_train), ("val", n_val), ("test", n_test)]
    total = sum(n for _, n in plan)
    with tqdm(total=total, desc="demo images", unit="img", mininterval=1.0) as bar:
        imgid = 0
        for split, n in plan:
            for _ in range(n):
                scene = random_scene(rng, colours, backgrounds)
                refs = captions(scene, rng, refs_per_image)
                filename = f"{imgid:06d}.jpg"
                path = out_dir / "images" / split / filename
                with atomic_path(path) as tmp:
                    render(scene, image_size).save(tmp, format="JPEG", quality=jpeg_quality)
                sentences = [{"tokens": r.replace(",", " ,").replace(":", " :").split(), "raw": r,
                              "imgid": imgid, "sentid": sentid + k} for k, r in enumerate(refs)]
                images.append({"filepath": split, "filename": filename, "imgid": imgid, "cocoid": imgid,
                               "split": split, "sentids": [s["sentid"] for s in sentences],
                               "sentences": sentences, "scene": scene_json(scene)})
                sentid += len(refs)
                imgid += 1
                bar.update()
    split_file = out_dir / "dataset_demo.json"
    name = "demo" if variant is None else f"demo-unseen-{variant}"
    write_json(split_file, {"dataset": name, "seed": seed, **({"variant": variant} if variant else {}),
                            "images": images})
    return split_file


def pretraining_pairs(n: int, image_size: int, seed: int, jpeg_quality: int = JPEG_QUALITY,
                      workers: int = 1) -> list[tuple[Image.Image, list[str]]]:
    """`n` (image, five captions) pairs of new random scenes, kept in memory and never written: the
    stand-ins' stand-in for the data CLIP and PAC-S are trained on beyond COCO (OpenAI CLIP's web pairs;
    PAC-S's generated positives). Each image goes through a JPEG encode and decode at the demo's quality,
    so it looks like the demo's files. Deterministic from `seed` (scenes and captions are drawn here in
    order; `workers` processes only draw the images)."""
    rng = random.Random(seed)
    scenes, refs = [], []
    for _ in range(n):
        scenes.append(random_scene(rng))
        refs.append(captions(scenes[-1], rng))
    jobs = [(scene, image_size, jpeg_quality) for scene in scenes]
    if workers > 1 and n > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = pool.map(_jpeg_scene, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        images = [_jpeg_scene(j) for j in jobs]
    return list(zip(images, refs))


def _jpeg_scene(job) -> Image.Image:
    """A scene drawn at `size` and read back from a JPEG at `quality` (what its demo file would hold)."""
    import io

    scene, size, quality = job
    buf = io.BytesIO()
    render(scene, size).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def split_scenes(splits_json, split: str) -> list[Scene] | None:
    """The scenes of a split of a demo set's normalised split file, in record order; None when its
    records carry no scenes (any set but the demo's)."""
    records = read_json(splits_json)["splits"][split]
    if not records or not all("scene" in r for r in records):
        return None
    return [scene_from_json(r["scene"]) for r in records]


def grammar_of(splits_json):
    """`grammatical` when `splits_json` (a dico-splits file) is a demo set (its `dataset` is "demo" or
    "demo-unseen-..."), else None: only the demo knows the grammar of its references."""
    if not splits_json:
        return None
    dataset = str(read_json(splits_json).get("dataset", ""))
    return grammatical if dataset.startswith("demo") else None

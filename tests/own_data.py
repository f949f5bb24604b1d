"""The demo's generated data re-expressed as a user's own data set: a flat folder of images and a
captions file (data.source folder), for the tests of dico.own_data and an end-to-end run of the DAG."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

from dico.demo import make_demo_data
from dico.io import read_json


def export_demo_as_folder(dst: Path, n_images: int = 60, image_size: int = 48, seed: int = 0,
                          refs_per_image: int = 5, fmt: str = "csv") -> tuple[Path, Path]:
    """Generate `n_images` demo scenes (`dico.demo.make_demo_data`, all in its train split: the folder's
    own rule splits them) and write them as `dst/images/NNNNNN.jpg` plus `dst/captions.<fmt>`: csv
    (image,caption, one row per caption; the demo's captions hold commas, so they are quoted), json
    ({image: [captions]}) or jsonl (one such object per image). Returns (images folder, captions file)."""
    dst = Path(dst)
    generated = make_demo_data(dst / "generated", n_images, 0, 0, image_size, seed, refs_per_image=refs_per_image)
    images = dst / "images"
    images.mkdir(parents=True, exist_ok=True)
    refs = {}
    for img in read_json(generated)["images"]:
        shutil.copyfile(generated.parent / "images" / img["filepath"] / img["filename"], images / img["filename"])
        refs[img["filename"]] = [s["raw"] for s in img["sentences"]]
    shutil.rmtree(dst / "generated")
    return images, write_captions(refs, dst / f"captions.{fmt}")


def write_captions(refs: dict[str, list[str]], path: Path) -> Path:
    """{image: [captions]} as a captions file of the format its extension names."""
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["image", "caption"])
            w.writerows([name, c] for name, caps in refs.items() for c in caps)
    elif path.suffix == ".json":
        path.write_text(json.dumps(refs, indent=1))
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps({name: caps}) + "\n" for name, caps in refs.items()))
    else:
        raise ValueError(f"{path}: no captions format {path.suffix!r} (csv, json, jsonl)")
    return path

"""Splits: the one normalised split file every downstream step reads, and image loading.

Input is a Karpathy-format file (`dataset_coco.json` of Karpathy & Fei-Fei; the demo writes the
same schema): `{"images": [{"filepath", "filename", "imgid", "cocoid"?, "split",
"sentences": [{"raw", "tokens", ...}, ...]}, ...]}`. `restval` images join `train`, giving the
standard 113,287 / 5,000 / 5,000 COCO split.

Output (`results/data/splits.json`):
`{"format": "dico-splits-v1", "dataset": str, "image_root": str,
  "splits": {"train"|"val"|"test": [{"image_id": int, "file": str, "captions": [str, ...]}, ...]}}`
with `file` relative to `image_root`. Records keep the order of the input file, so feature shards,
captions and metrics all index images the same way.

Extra evaluation sets (config evaluate.datasets) get a split file of their own in the same format
(`dico.eval_sets`); its `splits_from: {"train": <the captioner's split file>}` makes
`load_split(file, "train")` return the captioner's training split, against which `evaluate` counts
novel captions. Image files are opened by `dico.images`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

from .io import read_json, write_json

SPLITS = ("train", "val", "test")
SPLIT_ALIASES = {"restval": "train"}
FORMAT = "dico-splits-v1"


@dataclass(frozen=True)
class ImageRecord:
    image_id: int
    path: Path
    captions: tuple[str, ...]


def _karpathy_error(path: Path, where: str, what: str) -> ValueError:
    return ValueError(f"{path}: {where}: {what}. Expected the Karpathy schema of dataset_coco.json "
                      "({'images': [{'filepath', 'filename', 'imgid', 'split', 'sentences': [{'raw'}]}]}).")


def karpathy_images(karpathy_json: Path, raw, max_refs: int | None):
    """(split, record) per image of a Karpathy-format file, checked, in file order."""
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list):
        raise _karpathy_error(karpathy_json, "top level", "no 'images' list")
    seen: set[int] = set()
    for n, img in enumerate(raw["images"]):
        where = f"images[{n}]"
        if not isinstance(img, dict):
            raise _karpathy_error(karpathy_json, where, f"not an object but {type(img).__name__}")
        for key in ("filename", "split", "sentences"):
            if key not in img:
                raise _karpathy_error(karpathy_json, where, f"missing key '{key}'")
        split = SPLIT_ALIASES.get(img["split"], img["split"])
        if split not in SPLITS:
            raise _karpathy_error(karpathy_json, where, f"unknown split {img['split']!r} "
                                  f"(allowed: train, restval, val, test)")
        image_id = int(img.get("cocoid", img.get("imgid", n)))
        if image_id in seen:
            raise _karpathy_error(karpathy_json, where, f"duplicate image id {image_id}")
        seen.add(image_id)
        if not isinstance(img["sentences"], list):
            raise _karpathy_error(karpathy_json, where, "'sentences' is not a list")
        captions = []
        for m, sent in enumerate(img["sentences"]):
            text = sent.get("raw") if isinstance(sent, dict) else None
            if not isinstance(text, str) or not text.strip():
                raise _karpathy_error(karpathy_json, f"{where}.sentences[{m}]", "missing or empty 'raw'")
            captions.append(text.strip())
        if not captions:
            raise _karpathy_error(karpathy_json, where, "no sentences")
        if max_refs:
            captions = captions[:max_refs]
        file = str(Path(img.get("filepath", "")) / img["filename"])
        record = {"image_id": image_id, "file": file, "captions": captions}
        if isinstance(img.get("scene"), dict):  # what the image shows, where the file says (the demo's do)
            record["scene"] = img["scene"]
        yield split, record


def normalise_karpathy(karpathy_json: str | Path, image_root: str | Path, out: str | Path,
                       max_refs: int | None = None) -> dict[str, int]:
    """Write the normalised split file; return the number of images per split."""
    karpathy_json = Path(karpathy_json)
    raw = read_json(karpathy_json)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, record in karpathy_images(karpathy_json, raw, max_refs):
        splits[split].append(record)
    for split, items in splits.items():
        if not items:
            raise ValueError(f"{karpathy_json}: split '{split}' is empty; every one of "
                             f"{', '.join(SPLITS)} needs images")
    write_json(out, {"format": FORMAT, "dataset": raw.get("dataset", "unknown"),
                     "image_root": str(image_root), "splits": splits})
    return {s: len(v) for s, v in splits.items()}


def load_split(splits_json: str | Path, split: str) -> list[ImageRecord]:
    """The records of one split, with image paths resolved against the file's image_root."""
    splits_json = Path(splits_json)
    data = read_json(splits_json)
    if data.get("format") != FORMAT:
        raise ValueError(f"{splits_json}: not a normalised split file (format {data.get('format')!r}, "
                         f"expected {FORMAT!r}); produce it with `dico prepare-splits`")
    if split not in data["splits"]:
        linked = (data.get("splits_from") or {}).get(split)
        if linked:  # an evaluation set's file: the captioner's training split lives in the main split file
            return load_split(linked, split)
        raise KeyError(f"{splits_json}: no split {split!r} (has {', '.join(data['splits'])})")
    root = Path(data["image_root"])
    records = []
    for n, r in enumerate(data["splits"][split]):
        try:
            records.append(ImageRecord(int(r["image_id"]), root / r["file"], tuple(r["captions"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{splits_json}: splits.{split}[{n}] is malformed ({type(e).__name__}: {e}); "
                             "regenerate it with `dico prepare-splits`") from None
    if not records:
        raise ValueError(f"{splits_json}: split {split!r} is empty; it needs at least one image "
                         "(regenerate the split file from a Karpathy file that has this split)")
    return records


def references(records: Iterable[ImageRecord]) -> dict[int, list[str]]:
    return {r.image_id: list(r.captions) for r in records}

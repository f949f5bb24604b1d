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

Extra evaluation sets (config evaluate.datasets: nocaps, Flickr30k, a second demo set) get a split file
of their own, `results/data/ood/<name>/splits.json`, holding one split named after the set, from a
Karpathy-format file (one of its splits), a COCO captions file (nocaps: `images` with `id`,
`file_name` and an image URL, `annotations` with `image_id` and `caption`) or the demo generator. Its
`splits_from: {"train": <the captioner's split file>}` makes `load_split(file, "train")` return the
captioner's training split, against which `evaluate` counts novel captions.
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


def _karpathy_images(karpathy_json: Path, raw, max_refs: int | None):
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
        if isinstance(img.get("scene"), dict):  # a demo image: what it shows (dico.demo.describes)
            record["scene"] = img["scene"]
        yield split, record


def normalise_karpathy(karpathy_json: str | Path, image_root: str | Path, out: str | Path,
                       max_refs: int | None = None) -> dict[str, int]:
    """Write the normalised split file; return the number of images per split."""
    karpathy_json = Path(karpathy_json)
    raw = read_json(karpathy_json)
    splits: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for split, record in _karpathy_images(karpathy_json, raw, max_refs):
        splits[split].append(record)
    for split, items in splits.items():
        if not items:
            raise ValueError(f"{karpathy_json}: split '{split}' is empty; every one of "
                             f"{', '.join(SPLITS)} needs images")
    write_json(out, {"format": FORMAT, "dataset": raw.get("dataset", "unknown"),
                     "image_root": str(image_root), "splits": splits})
    return {s: len(v) for s, v in splits.items()}


# -- extra evaluation sets (evaluate.datasets) ---------------------------------------------------
EVAL_FORMATS = ("karpathy", "coco", "demo")


def eval_set_records(fmt: str, annotations: str | Path, split: str = "test",
                     max_refs: int | None = None, url_key: str | None = None) -> tuple[str, list[dict]]:
    """(source data set name, records) of one evaluation set; with `url_key` (coco format) each
    record also carries the image's URL under "url" (where prepare fetches a missing image from)."""
    annotations = Path(annotations)
    raw = read_json(annotations)
    if fmt in ("karpathy", "demo"):
        if split not in SPLITS:
            raise ValueError(f"{annotations}: split {split!r} is not a Karpathy split (train, val, test)")
        records = [r for s, r in _karpathy_images(annotations, raw, max_refs) if s == split]
        if not records:
            raise ValueError(f"{annotations}: no images in split {split!r}; set the data set's split "
                             "(evaluate.datasets.<name>.split) to one the file has")
        return raw.get("dataset", "unknown"), records
    if fmt != "coco":
        raise ValueError(f"unknown evaluation-set format {fmt!r} (one of {', '.join(EVAL_FORMATS)})")
    return _coco_source_name(raw), _coco_records(annotations, raw, max_refs, url_key)


def _coco_source_name(raw) -> str:
    info = raw.get("info") if isinstance(raw, dict) else None
    return str((info or {}).get("description") or "unknown") if isinstance(info, dict) else "unknown"


def _coco_records(path: Path, raw, max_refs: int | None, url_key: str | None) -> list[dict]:
    """COCO captions format (nocaps val): images in file order, their captions in annotation order."""
    schema = ("COCO captions format ({'images': [{'id', 'file_name', ...}], "
              "'annotations': [{'image_id', 'caption'}]})")
    if not isinstance(raw, dict) or not isinstance(raw.get("images"), list) or not isinstance(
            raw.get("annotations"), list):
        raise ValueError(f"{path}: expected the {schema}")
    captions: dict[int, list[str]] = {}
    for n, a in enumerate(raw["annotations"]):
        if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
            raise ValueError(f"{path}: annotations[{n}] is not an {{'image_id', 'caption'}} object ({schema})")
        if a["caption"].strip():
            captions.setdefault(int(a["image_id"]), []).append(a["caption"].strip())
    records, seen = [], set()
    for n, im in enumerate(raw["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise ValueError(f"{path}: images[{n}] needs 'id' and 'file_name' ({schema})")
        image_id = int(im["id"])
        if image_id in seen:
            raise ValueError(f"{path}: images[{n}]: duplicate image id {image_id}")
        seen.add(image_id)
        if not captions.get(image_id):
            raise ValueError(f"{path}: images[{n}] (id {image_id}) has no caption in 'annotations'")
        record = {"image_id": image_id, "file": im["file_name"], "captions": captions[image_id][:max_refs or None]}
        if url_key:
            if not isinstance(im.get(url_key), str) or not im[url_key]:
                raise ValueError(f"{path}: images[{n}] (id {image_id}) has no {url_key!r} to fetch the image "
                                 "from; set evaluate.datasets.<name>.fetch_images to the key holding its URL")
            record["url"] = im[url_key]
        records.append(record)
    if not records:
        raise ValueError(f"{path}: no images")
    return records


def write_eval_set(name: str, dataset: str, records: list[dict], image_root: str | Path, out: str | Path,
                   train_from: str | Path | None = None) -> None:
    """The split file of one evaluation set: one split named `name`; `train_from` is the captioner's
    split file, whose train split `load_split(out, "train")` then returns."""
    if name in SPLITS:
        raise ValueError(f"evaluation set name {name!r} would shadow COCO's split; choose another name")
    data = {"format": FORMAT, "dataset": dataset, "image_root": str(image_root),
            "splits": {name: [{k: r[k] for k in ("image_id", "file", "captions")} for r in records]}}
    if train_from:
        data["splits_from"] = {"train": str(train_from)}
    write_json(out, data)


def missing_images(records: list[dict], image_root: str | Path) -> list[Path]:
    root = Path(image_root)
    return [root / r["file"] for r in records if not (root / r["file"]).is_file()]


def fetch_images(jobs: list[tuple[str, Path]], *, workers: int = 8, retries: int = 5, timeout: float = 60.0,
                 log=print) -> int:
    """Download each (url, destination) whose destination does not exist yet; return how many arrived.

    Each image is read whole, checked to decode (an HTML error page or a cut transfer is not an image),
    and renamed into place (io.atomic_path): a killed fetch keeps the images that arrived and the rerun
    asks only for the rest. Failures are retried with back-off, then reported together."""
    import io as _io
    import time
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from PIL import Image

    from .io import atomic_path

    todo = [(url, Path(dest)) for url, dest in jobs if not Path(dest).exists()]

    def one(job):
        url, dest = job
        last = None
        for attempt in range(retries + 1):
            if attempt:
                time.sleep(min(2.0 ** attempt, 30.0))
            try:
                req = urllib.request.Request(url, headers={"User-Agent": "dico-fetch-images/1"})
                with urllib.request.urlopen(req, timeout=timeout) as resp:
                    data = resp.read()
                with Image.open(_io.BytesIO(data)) as im:
                    im.load()  # a full decode: an error page or a cut file is not an image
            except Exception as e:  # HTTP error, reset, timeout, not an image: all retried, then reported
                last = f"{type(e).__name__}: {e}"
                continue
            with atomic_path(dest) as tmp:
                tmp.write_bytes(data)
            return None
        return f"{url} -> {dest}: {last}"

    if not todo:
        return 0
    log(f"fetching {len(todo)} of {len(jobs)} images ({len(jobs) - len(todo)} already there)")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        failed = [f for f in pool.map(one, todo) if f]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(todo)} images could not be fetched (after {retries + 1} attempts "
                           f"each), e.g. {failed[:3]}; rerun to retry them (images that arrived are kept), or put "
                           "the images in the image folder by hand")
    return len(todo)


def check_eval_sets(config: dict) -> None:
    """What the schema cannot say about evaluate.datasets; raises ValueError naming the key and the fix."""
    problems = []
    for name, entry in config["evaluate"]["datasets"].items():
        key = f"evaluate.datasets.{name}"
        if entry["format"] == "demo":
            if config["data"]["source"] != "demo":
                problems.append(f"{key}: format demo needs data.source demo (the demo models only know the "
                                "demo's shapes)")
            continue
        for field in ("annotations", "image_root"):
            if not entry.get(field):
                problems.append(f"{key}.{field}: format {entry['format']} needs it (where the file / images are)")
        if entry.get("member") and not entry.get("url"):
            problems.append(f"{key}.member: set url to the zip it is an entry of")
        if entry.get("fetch_images") and entry["format"] != "coco":
            problems.append(f"{key}.fetch_images: only a COCO captions file lists image URLs (format coco)")
    if problems:
        raise ValueError("invalid configuration\n" + "\n".join(f"  - {p}" for p in problems))


def eval_set_spec(config: dict, name: str) -> dict:
    """What prepare-splits needs to build evaluation set `name` of a validated config (what changes the
    split file's content, and nothing else: its table label and the fetch settings are left out)."""
    sets = config["evaluate"]["datasets"]
    if name not in sets:
        raise KeyError(f"{name!r} is not an evaluate.datasets entry (have: {', '.join(sets) or 'none'})")
    entry = sets[name]
    spec = {"name": name, **{k: v for k, v in entry.items() if k not in ("label", "url", "sha256", "member")}}
    if entry["format"] == "demo":
        spec["demo"] = {**entry["demo"], "image_size": config["data"]["demo"]["image_size"],
                        "refs_per_image": config["data"]["demo"]["refs_per_image"]}
    else:
        spec.pop("demo", None)
    return spec


def prepare_eval_set(spec: dict, out: str | Path, train_from: str | Path | None = None, *, retries: int = 5,
                     timeout: float = 60.0, workers: int = 8, log=print) -> int:
    """Write the split file of one evaluation set (eval_set_spec's dict); return its number of images.

    demo: generates the images under <out folder>/demo first. coco with `fetch_images`: downloads the
    images missing under image_root from the URL each image entry holds. Then every image must be in
    image_root, or this fails naming the config key and what to do."""
    name, fmt = spec["name"], spec["format"]
    key = f"evaluate.datasets.{name}"
    if fmt == "demo":
        from .demo import make_demo_data

        d = spec["demo"]
        folder = Path(out).parent / "demo"
        annotations = make_demo_data(folder, 0, 0, d["n_images"], d["image_size"], d["seed"],
                                     refs_per_image=d["refs_per_image"], variant=d["variant"])
        image_root, split = folder / "images", "test"
    else:
        for field in ("annotations", "image_root"):
            if not spec.get(field):
                raise ValueError(f"{key}.{field} is not set: format {fmt} needs the annotations file and the "
                                 "image folder")
        annotations, image_root, split = spec["annotations"], spec["image_root"], spec["split"]
    url_key = spec.get("fetch_images") if fmt == "coco" else None
    dataset, records = eval_set_records(fmt, annotations, split, spec.get("max_refs"), url_key)
    if url_key:
        fetch_images([(r["url"], Path(image_root) / r["file"]) for r in records], workers=workers,
                     retries=retries, timeout=timeout, log=log)
    missing = missing_images(records, image_root)
    if missing:
        hint = ("set fetch_images to the image field holding a URL (nocaps: coco_url) to download them, or "
                if fmt == "coco" and not url_key else "")
        raise FileNotFoundError(
            f"{key}.image_root: {len(missing)} of {len(records)} images of {annotations} are not in {image_root} "
            f"(e.g. {', '.join(map(str, missing[:3]))}); {hint}put the images there or point image_root at "
            "your copy (Flickr30k and Flickr8k images cannot be downloaded by URL: their authors give them "
            "out on request)")
    write_eval_set(name, dataset, records, image_root, out, train_from)
    return len(records)


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


def load_image(path: str | Path, split: str | None = None, draft_size: int | None = None):
    """Open an image as RGB, with an error that names the file (and split) when it is broken.

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
        raise ValueError(f"image {path}{where} cannot be decoded ({e}); replace the file, or set "
                         "features.skip_broken_images: true to skip and count such images") from None

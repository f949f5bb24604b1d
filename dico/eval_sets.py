"""Extra evaluation sets (config evaluate.datasets: nocaps, Flickr30k, a second demo set): one split
file each, `results/data/ood/<name>/splits.json`, holding one split named after the set.

From a Karpathy-format file (one of its splits), a COCO captions file (nocaps: `images` with `id`,
`file_name` and an image URL, `annotations` with `image_id` and `caption`) or, for a demo set, the
Karpathy file the demo generator wrote. Its `splits_from: {"train": <the captioner's split file>}`
makes `load_split(file, "train")` return the captioner's training split, against which `evaluate`
counts novel captions.
"""
from __future__ import annotations

from pathlib import Path

from .data import FORMAT, SPLITS, karpathy_images
from .io import atomic_path, read_json, write_json

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
        records = [r for s, r in karpathy_images(annotations, raw, max_refs) if s == split]
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


def demo_set_folder(out: str | Path) -> Path:
    """Where a demo evaluation set's generated images and Karpathy file go: beside its split file."""
    return Path(out).parent / "demo"


def prepare_eval_set(spec: dict, out: str | Path, train_from: str | Path | None = None, *, retries: int = 5,
                     timeout: float = 60.0, workers: int = 8, generated: str | Path | None = None, log=print) -> int:
    """Write the split file of one evaluation set (eval_set_spec's dict); return its number of images.

    demo: `generated` is the Karpathy file the demo generator wrote under `demo_set_folder(out)` (its
    test split). coco with `fetch_images`: downloads the images missing under image_root from the URL
    each image entry holds. Then every image must be in image_root, or this fails naming the config
    key and what to do."""
    name, fmt = spec["name"], spec["format"]
    key = f"evaluate.datasets.{name}"
    if fmt == "demo":
        if generated is None:
            raise ValueError(f"{key}: a demo set is generated first (`dico prepare-splits --eval-set {name}` does it)")
        annotations, image_root, split = generated, demo_set_folder(out) / "images", "test"
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

"""Your own data set: a folder of images and a captions file, split by image into train / val / test.

The captions file is one of
    .csv    a header `image,caption` (other columns are ignored), one row per caption;
    .json   pacscore's reference layout `{"<image>": ["<caption>", ...], ...}`;
    .jsonl  one such object per line (usually one image per line).
`<image>` is the file's path relative to the images folder ("cat.jpg", "holiday/cat.jpg").

The split is decided per image by a hash of its name (docs/own_data.md has the rule and what it
guarantees): u = the first 8 bytes of sha256(SPLIT_SALT + name) read as a number in [0, 1).
Fractions are thresholds on u (test below f_test, val below f_test + f_val), so an image's split
depends on its own name only: adding or removing other images never moves it. Counts take the images
of smallest u (test first, then val): exact sizes, but an added image can push an old one from test
to val or from val to train (no rule can keep both exact counts and every old image in place).
The name hashed is Unicode NFC with "/" separators, so a copy of the folder on another system (macOS
writes names in NFD) splits the same. The image id is 52 bits of the same digest: stable as well.

The output is the normalised split file of `dico.data` (records in name order), so every later step
reads it like COCO's.
"""
from __future__ import annotations

import csv
import hashlib
import json
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from .data import FORMAT, SPLITS
from .images import is_image_file
from .io import InputError, read_json, write_json

CAPTION_FORMATS = (".csv", ".json", ".jsonl")
SPLIT_SALT = "dico-own-data-v1:"
MAX_LISTED = 20  # problems listed in one error (the count of the rest follows)


def image_key(name: str) -> str:
    """The name of an image as the split rule hashes it and the captions file must spell it: NFC,
    "/" separators, no "./" segments or doubled slashes."""
    parts = unicodedata.normalize("NFC", name.strip()).replace("\\", "/").split("/")
    return "/".join(p for p in parts if p not in ("", "."))


def unit_hash(key: str) -> tuple[float, int]:
    """(u in [0, 1), image id < 2**52) of an image key: the split rule's number and a stable id."""
    digest = hashlib.sha256((SPLIT_SALT + key).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64, int.from_bytes(digest[8:15], "big") >> 4


def assign_splits(keys, val: float | int, test: float | int) -> dict[str, str]:
    """{key: split} by the rule of the module docstring; `val` / `test` both fractions in (0, 1) or
    both counts (int >= 1)."""
    u = {k: unit_hash(k)[0] for k in keys}
    if isinstance(val, int) and isinstance(test, int):
        order = sorted(u, key=lambda k: (u[k], k))
        return {k: "test" if i < test else "val" if i < test + val else "train" for i, k in enumerate(order)}
    return {k: "test" if x < test else "val" if x < test + val else "train" for k, x in u.items()}


@dataclass
class Problems:
    """Every problem of a data set, each naming its file, its entry and the fix, raised as one error."""
    items: list[str] = field(default_factory=list)

    def add(self, where: str, what: str, fix: str) -> None:
        self.items.append(f"{where}: {what}; {fix}")

    def raise_any(self, title: str) -> None:
        if self.items:
            more = len(self.items) - MAX_LISTED
            lines = self.items[:MAX_LISTED] + ([f"... and {more} more"] if more > 0 else [])
            raise InputError(f"{title}: {len(self.items)} problem(s)\n" + "\n".join(f"  - {x}" for x in lines))


def scan_images(folder: str | Path, problems: Problems) -> dict[str, str]:
    """{key: path relative to `folder` as on disk} of every image file below it (hidden files and
    folders skipped); names that would be one file on a case-insensitive system are problems."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{folder}: the images folder does not exist or is not a folder; set data.folder.images "
                         "to the folder that holds your images")
    found: dict[str, str] = {}
    folded: dict[str, str] = {}
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder).as_posix()
        if any(p.startswith(".") for p in rel.split("/")) or not is_image_file(path):
            continue
        key = image_key(rel)
        other = found.get(key) or folded.get(key.casefold())
        if other is not None:
            problems.add(f"{folder / rel}", f"its name collides with {folder / other} (the same name in another "
                         "letter case or Unicode form; one file on macOS and Windows)", "rename one of the two")
            continue
        found[key], folded[key.casefold()] = rel, rel
    return found


def check_images(folder: Path, files: dict[str, str], problems: Problems) -> None:
    """Each image's header can be read (format and size); a truncated body is found later, by
    cache_features (features.skip_broken_images)."""
    from PIL import Image, UnidentifiedImageError

    for rel in files.values():
        try:
            with Image.open(folder / rel) as im:
                if min(im.size) < 1:
                    raise OSError(f"size {im.size}")
        except (UnidentifiedImageError, OSError, ValueError) as e:
            problems.add(str(folder / rel), f"cannot be read as an image ({e})",
                         "replace the file, or remove it and its captions")


def as_size(value) -> float | int:
    """A split size of the config: an int count, or a float fraction (5.0 in YAML is the count 5)."""
    return int(value) if isinstance(value, float) and value.is_integer() and value >= 1 else value


def size_problems(val, test) -> list[str]:
    """What is wrong with data.folder.val / .test together (the schema checks each alone)."""
    val, test = as_size(val), as_size(test)
    if isinstance(val, int) != isinstance(test, int):
        return [f"data.folder.val ({val}) and data.folder.test ({test}): give both as fractions (0.05) or both "
                "as counts (500)"]
    if isinstance(val, float) and val + test >= 1:
        return [f"data.folder.val + data.folder.test = {val + test:g} leaves no image for train; make the sum "
                "less than 1"]
    return []


# -- the captions file: {key: [captions]} and where each key is first named --------------------------
def read_captions(path: str | Path, problems: Problems) -> tuple[dict[str, list[str]], dict[str, str]]:
    path = Path(path)
    if path.suffix.lower() not in CAPTION_FORMATS:
        raise InputError(f"{path}: unknown captions format {path.suffix!r}; give a .csv (image,caption), .json or "
                         ".jsonl ({image: [captions]}) file (data.folder.captions)")
    if not path.is_file():
        raise InputError(f"{path}: the captions file does not exist; set data.folder.captions to your file")
    entries: dict[str, list[str]] = {}
    where: dict[str, str] = {}
    reader = {".csv": _read_csv, ".json": _read_json, ".jsonl": _read_jsonl}[path.suffix.lower()]
    try:
        reader(path, entries, where, problems)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start}); save the captions file as UTF-8") from None
    return entries, where


def _add(path: Path, at: str, name, captions: list, entries, where, problems: Problems, merge: bool) -> None:
    """One entry's captions, checked; `merge`: a name met again adds captions (CSV rows) instead of
    being a duplicate (JSON keys)."""
    if not isinstance(name, str) or not image_key(name):
        return problems.add(f"{path}: {at}", f"no image name ({name!r})", "give the image's path relative to the "
                            "images folder")
    key = image_key(name)
    if name.strip().startswith(("/", "\\")) or ".." in key.split("/"):
        return problems.add(f"{path}: {at}", f"image {name!r} is not a path inside the images folder",
                            "give its path relative to data.folder.images (cat.jpg, holiday/cat.jpg)")
    if key in where and not merge:
        return problems.add(f"{path}: {at}", f"image {key!r} is named again (first at {where[key]}; names are "
                            "compared after removing ./ and unifying / and Unicode forms)",
                            "give each image once, with all its captions in one list")
    where.setdefault(key, at)
    for n, text in enumerate(captions):
        entry = f"{path}: {at}" + ("" if merge else f", caption {n}")
        if not isinstance(text, str):
            problems.add(entry, f"caption {json.dumps(text)[:60]} of {key!r} is not text", "write it as a string")
        elif not text.strip():
            problems.add(entry, f"empty caption for {key!r}",
                         "write the caption, or delete the " + ("row" if merge else "empty string"))
        else:
            entries.setdefault(key, []).append(text.strip())


def _read_csv(path: Path, entries, where, problems: Problems) -> None:
    with open(path, newline="", encoding="utf-8-sig") as f:
        rows = csv.reader(f)
        header = [h.strip() for h in next(rows, [])]
        if "image" not in header or "caption" not in header:
            raise InputError(f"{path}: line 1: the header is {','.join(header) or '(empty)'!r}, not 'image,caption'; "
                             "make the first line the header image,caption (then one row per caption: "
                             "cat.jpg,a cat on a mat)")
        i, c = header.index("image"), header.index("caption")
        for row in rows:
            at = f"line {rows.line_num}"
            if not any(x.strip() for x in row):
                continue
            if len(row) != len(header):
                problems.add(f"{path}: {at}", f"{len(row)} fields, the header has {len(header)}",
                             'put a caption that holds a comma in double quotes: cat.jpg,"a cat, asleep"')
                continue
            _add(path, at, row[i], [row[c]], entries, where, problems, merge=True)


def _read_json(path: Path, entries, where, problems: Problems) -> None:
    raw = read_json(path, unique_keys=True)
    if not isinstance(raw, dict):
        raise InputError(f"{path}: top level is a {type(raw).__name__}, not an object; write pacscore's reference "
                         'layout {"cat.jpg": ["a cat on a mat", ...], ...}')
    for name, captions in raw.items():
        _json_entry(path, f"key {name!r}", name, captions, entries, where, problems)


def _read_jsonl(path: Path, entries, where, problems: Problems) -> None:
    for n, line in enumerate(path.read_text(encoding="utf-8-sig").splitlines(), 1):
        if not line.strip():
            continue
        try:
            pairs = json.loads(line, object_pairs_hook=lambda p: p)
        except json.JSONDecodeError as e:
            problems.add(f"{path}: line {n}", f"not valid JSON ({e.msg}, column {e.colno})",
                         'write one object per line: {"cat.jpg": ["a cat on a mat", ...]}')
            continue
        if not isinstance(pairs, list):
            problems.add(f"{path}: line {n}", f"a {type(pairs).__name__}, not an object",
                         'write one object per line: {"cat.jpg": ["a cat on a mat", ...]}')
            continue
        for name, captions in pairs:
            _json_entry(path, f"line {n}, key {name!r}", name, captions, entries, where, problems)


def _json_entry(path: Path, at: str, name: str, captions, entries, where, problems: Problems) -> None:
    if not isinstance(captions, list) or not captions:
        return problems.add(f"{path}: {at}", f"{json.dumps(captions)[:60]} is not a non-empty list of captions",
                            f'write "{name}": ["a caption", "another caption"]')
    _add(path, at, name, captions, entries, where, problems, merge=False)


# -- the data set -> the split file -------------------------------------------------------------------
def match(folder: Path, files: dict[str, str], captions_path: Path, entries, where, problems: Problems) -> None:
    """Every captioned image is a file of the folder, and every image file has captions."""
    folded = {k.casefold(): k for k in files}
    for key in entries:
        if key not in files:
            near = folded.get(key.casefold())
            fix = (f"the folder has {near!r}: write the name as it is (names are case-sensitive)" if near else
                   f"add the image as {folder / key}, or remove its captions")
            problems.add(f"{captions_path}: {where[key]}", f"image {key!r} is not in {folder}", fix)
    for key, rel in files.items():
        if key not in entries and key not in where:
            problems.add(str(folder / rel), f"has no caption in {captions_path}",
                         f"add captions for {key!r} to {captions_path.name}, or move the image out of {folder}")


def check_sizes(folder: Path, splits: dict[str, str], val, test) -> None:
    """Every split holds at least one image (the pipeline trains on train, selects on val, scores test)."""
    n = len(splits)
    if isinstance(val, int):
        if n < val + test + 1:
            raise InputError(f"{folder}: {n} images, but data.folder.val ({val}) + data.folder.test ({test}) leave "
                             "none for train; lower the counts, give fractions, or add images")
        return
    for split, asked in (("train", 1 - val - test), ("val", val), ("test", test)):
        if not any(s == split for s in splits.values()):
            key = "val or data.folder.test (lower them)" if split == "train" else f"{split} (raise it)"
            raise InputError(f"{folder}: split {split} got none of the {n} images (each image falls in it with "
                             f"probability {asked:g}, by the hash of its name); change data.folder.{key}, give "
                             "counts instead of fractions, or add images")


def image_ids(folder: Path, files: dict[str, str]) -> dict[str, int]:
    """{key: image id} (52 bits of the name's hash); a clash, about one in 10^4 for a million images, is named."""
    ids: dict[int, str] = {}
    for key in files:
        i = unit_hash(key)[1]
        if i in ids:
            raise InputError(f"{folder / files[key]}: its image id {i} (a hash of the name) equals that of "
                             f"{folder / files[ids[i]]}; rename one of the two")
        ids[i] = key
    return {k: i for i, k in ids.items()}


def prepare_folder(spec: dict, out: str | Path, log=print) -> dict[str, int]:
    """Read and check the data set of `spec` (data.folder of the config, with data.max_refs), split it and
    write the normalised split file `out`; return the number of images per split."""
    folder, captions_path = Path(spec["images"]), Path(spec["captions"])
    val, test = as_size(spec["val"]), as_size(spec["test"])
    bad = size_problems(val, test)
    if bad:
        raise InputError(bad[0])
    problems = Problems()
    files = scan_images(folder, problems)
    entries, where = read_captions(captions_path, problems)
    match(folder, files, captions_path, entries, where, problems)
    check_images(folder, files, problems)
    problems.raise_any(f"data set {folder} + {captions_path}")
    splits = assign_splits(sorted(files), val, test)
    check_sizes(folder, splits, val, test)
    ids, max_refs = image_ids(folder, files), spec.get("max_refs")
    records: dict[str, list[dict]] = {s: [] for s in SPLITS}
    for key in sorted(files):
        records[splits[key]].append({"image_id": ids[key], "file": files[key],
                                     "captions": entries[key][:max_refs or None]})
    write_json(out, {"format": FORMAT, "dataset": spec.get("name") or folder.resolve().name,
                     "image_root": str(spec["images"]), "splits": records})
    counts = {s: len(v) for s, v in records.items()}
    log(f"{len(files)} images, {sum(len(c) for c in entries.values())} captions of {captions_path} -> {counts}")
    return counts

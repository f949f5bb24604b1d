"""Reading captions to score: candidates and references in the layouts people already have, matched
image by image, and the image files they name.

  candidates  a COCO results list [{"image_id", "caption"}], or pacscore's {"image name": "caption"};
  references  pacscore's {"image name": [captions]}, a COCO captions_*.json, a Karpathy
              dataset_*.json (--split) or a dico split file (--split);
  images      a folder, searched by the reference file's own file name (Karpathy filepath/filename,
              COCO file_name), by the image name (image1 -> image1.jpg / .png, as pacscore's
              compute_metrics.py does) or by a COCO id (COCO_val2014_000000391895.jpg).

Image ids are kept as they are (strings or ints). JSON object keys are strings, so a candidate id 42
also matches a reference named "42", and a candidate may also be named by its image's file name.
Used by `dico score` and by `dico evaluate` outside the pipeline; every error names the file, the
entry and the fix (`InputError`).
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..data import FORMAT as SPLIT_FORMAT
from ..images import image_files
from ..io import InputError, read_json

log = logging.getLogger("dico")

CANDIDATE_FORMATS = ('a COCO results list [{"image_id": ..., "caption": "..."}, ...] or pacscore\'s '
                     '{"image name": "caption", ...}')
REFERENCE_FORMATS = ('pacscore\'s {"image name": ["caption", ...]}, a COCO captions_*.json '
                     '({"annotations": [{"image_id", "caption"}]}), a Karpathy dataset_*.json '
                     '({"images": [{"filename", "sentences": [{"raw"}]}]}) or a dico split file')
COCO_ONLY = "--metrics bleu,meteor,rouge,cider,spice"


def _is_id(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def load_candidates(path: str | Path) -> dict:
    """{image id: caption} from a COCO results list or pacscore's {name: caption}."""
    path = Path(path)
    data = read_json(path, unique_keys=True)
    out: dict = {}
    if isinstance(data, list):
        for n, item in enumerate(data):
            if not (isinstance(item, dict) and _is_id(item.get("image_id")) and isinstance(item.get("caption"), str)):
                raise InputError(f"{path}: entry [{n}] is not an {{\"image_id\": int or str, \"caption\": str}} "
                                 f"object ({item!r:.100}); give {CANDIDATE_FORMATS}")
            if item["image_id"] in out:
                raise InputError(f"{path}: entry [{n}]: image_id {item['image_id']!r} has a second caption; "
                                 "keep one caption per image")
            out[item["image_id"]] = item["caption"]
    elif isinstance(data, dict) and not _looks_like_references(data):
        for key, caption in data.items():
            if not isinstance(caption, str):
                hint = " (a list: is this the references file? pass it as --refs)" if isinstance(caption, list) else ""
                raise InputError(f"{path}: entry {key!r} is a {type(caption).__name__}, not a caption string"
                                 f"{hint}; give {CANDIDATE_FORMATS}")
            out[key] = caption
    else:
        what = "a references file" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise InputError(f"{path}: unknown candidates format ({what}); give {CANDIDATE_FORMATS}")
    if not out:
        raise InputError(f"{path}: no captions in it; give {CANDIDATE_FORMATS}")
    return out


def _looks_like_references(data: dict) -> bool:
    return "annotations" in data or isinstance(data.get("images"), list) or "format" in data


@dataclass
class References:
    """refs {id: [captions]}, plus where each image may be (paths relative to --images, or
    absolute) and other names of an image (file name and stem, str(id))."""
    path: Path
    format: str
    refs: dict
    files: dict = field(default_factory=dict)
    aliases: dict = field(default_factory=dict)
    unannotated: set = field(default_factory=set)  # images a COCO file lists without any caption

    def alias(self, name: str, image_id) -> None:
        # a name shared by two images is ambiguous: remember that, so a candidate using it fails clearly
        if name in self.aliases and self.aliases[name] != image_id:
            self.aliases[name] = None
        else:
            self.aliases[name] = image_id


def _captions(path: Path, where: str, caps) -> list[str]:
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise InputError(f"{path}: {where} needs a non-empty list of caption strings, got {caps!r:.100}; "
                         f"give {REFERENCE_FORMATS}")
    return list(caps)


def load_references(path: str | Path, split: str | None = None) -> References:
    """References in any of the formats of REFERENCE_FORMATS (see the module docstring)."""
    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == SPLIT_FORMAT:
        out = _split_file(path, data, split or "test")
    elif isinstance(data, dict) and isinstance(data.get("annotations"), list):
        out = _coco_captions(path, data)
    elif isinstance(data, dict) and isinstance(data.get("images"), list):
        out = _karpathy(path, data, split)
    elif isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        out = References(path, "pacscore", {k: _captions(path, f"entry {k!r}", v) for k, v in data.items()})
    else:
        what = f"a JSON {type(data).__name__}" if not isinstance(data, dict) else (
            "an object whose values are not lists of captions (is this the candidates file? pass it as --captions)")
        raise InputError(f"{path}: unknown references format ({what}); give {REFERENCE_FORMATS}")
    if not out.refs:
        raise InputError(f"{path}: no references" + (f" in split {split!r}; check --split" if split else ""))
    return out


def _split_file(path: Path, data: dict, split: str) -> References:
    splits, root = data.get("splits"), data.get("image_root", "")
    if not isinstance(splits, dict) or not isinstance(root, str):
        raise InputError(f"{path}: a dico split file without a 'splits' object or an 'image_root' string; "
                         "regenerate it with `dico prepare-splits`")
    if split not in splits:
        raise InputError(f"{path}: no split {split!r} (has {', '.join(map(str, splits)) or 'none'}); pass --split")
    if not isinstance(splits[split], list):
        raise InputError(f"{path}: splits.{split} is not a list of images; regenerate it with `dico prepare-splits`")
    out = References(path, f"dico split file ({split})", {})
    for n, r in enumerate(splits[split]):
        if not isinstance(r, dict) or not _is_id(r.get("image_id")) or not isinstance(r.get("file"), str):
            raise InputError(f"{path}: splits.{split}[{n}] is malformed; regenerate it with `dico prepare-splits`")
        i = r["image_id"]
        out.refs[i] = _captions(path, f"splits.{split}[{n}].captions", r.get("captions"))
        out.files[i] = [r["file"], str(Path(root) / r["file"])]
        _alias_file(out, r["file"], i)
    return out


def _coco_captions(path: Path, data: dict) -> References:
    out = References(path, "COCO captions", {})
    for n, a in enumerate(data["annotations"]):
        if not (isinstance(a, dict) and _is_id(a.get("image_id")) and isinstance(a.get("caption"), str)):
            raise InputError(f"{path}: annotations[{n}] is not an {{\"image_id\", \"caption\": str}} object "
                             f"({a!r:.100}); give {REFERENCE_FORMATS}")
        out.refs.setdefault(a["image_id"], []).append(a["caption"])
    images = data.get("images") if isinstance(data.get("images"), list) else []
    for im in images:
        if not (isinstance(im, dict) and _is_id(im.get("id"))):
            continue
        name = im.get("file_name") if isinstance(im.get("file_name"), str) else None
        if im["id"] not in out.refs:
            out.unannotated.update({im["id"], str(im["id"]), *([name, Path(name).stem] if name else [])})
        elif name:
            out.files[im["id"]] = [name]
            _alias_file(out, name, im["id"])
    return out


def _karpathy(path: Path, data: dict, split: str | None) -> References:
    out = References(path, "Karpathy" + (f" ({split})" if split else ""), {})
    splits = sorted({str(im.get("split")) for im in data["images"] if isinstance(im, dict)})
    if split is not None and split not in splits and not (split == "train" and "restval" in splits):
        raise InputError(f"{path}: no images in split {split!r}; its splits are {', '.join(splits)}: pass one of "
                         "them as --split")
    for n, im in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(im, dict) or not isinstance(im.get("sentences"), list) or not (
                _is_id(im.get("cocoid")) or _is_id(im.get("imgid"))):
            raise InputError(f"{path}: {where} needs 'cocoid' (or 'imgid') and a 'sentences' list (the Karpathy "
                             "dataset_*.json schema)")
        if split is not None and im.get("split") != split and not (split == "train" and im.get("split") == "restval"):
            continue
        caps = [s.get("raw") if isinstance(s, dict) else None for s in im["sentences"]]
        bad = next((m for m, c in enumerate(caps) if not isinstance(c, str)), None)
        if bad is not None:
            raise InputError(f"{path}: {where}.sentences[{bad}] has no 'raw' caption string; give {REFERENCE_FORMATS}")
        i = im["cocoid"] if _is_id(im.get("cocoid")) else im["imgid"]
        out.refs[i] = _captions(path, f"{where}.sentences (their 'raw')", caps)
        if isinstance(im.get("filename"), str):
            out.files[i] = [str(Path(im.get("filepath", "")) / im["filename"]), im["filename"]]
            _alias_file(out, im["filename"], i)
    return out


def _alias_file(out: References, file: str, image_id) -> None:
    name = Path(file).name
    out.alias(name, image_id)
    out.alias(Path(name).stem, image_id)


def match(cands: dict, refs: References, cand_path) -> dict:
    """{candidate id: reference id}; every candidate needs a reference (else InputError)."""
    out, missing, ambiguous, taken = {}, [], [], {}
    for key in cands:
        rid = _lookup(key, refs)
        if rid is _AMBIGUOUS:
            ambiguous.append(key)
        elif rid is None:
            missing.append(key)
        elif rid in taken:
            raise InputError(f"{cand_path}: candidates {taken[rid]!r} and {key!r} are both captions of reference "
                             f"image {rid!r} of {refs.path}; keep one caption per image")
        else:
            out[key], taken[rid] = rid, key
    if ambiguous:
        raise InputError(f"{cand_path}: candidate {ambiguous[0]!r} names more than one image of {refs.path} "
                         "(two images share that file name); name candidates by image id")
    unannotated = [k for k in missing if k in refs.unannotated or str(k) in refs.unannotated]
    if unannotated:
        raise InputError(f"{cand_path}: candidate {unannotated[0]!r} is an image of {refs.path} with no caption in its "
                         f"'annotations' ({len(unannotated)} such candidates): there are no references to score it "
                         "against; leave it out of the candidates or add its references")
    if missing:
        examples = ", ".join(repr(k) for k in list(refs.refs)[:3])
        raise InputError(f"{cand_path}: {len(missing)} of {len(cands)} candidates have no reference in {refs.path} "
                         f"[{refs.format}] (first: {', '.join(map(repr, missing[:5]))}). Both files must name "
                         f"images the same way: its images are named like {examples}"
                         + ("; or the candidates belong to another --split" if refs.format.startswith(("Karpathy", "dico")) else ""))
    return out


_AMBIGUOUS = object()


def _lookup(key, refs: References):
    for k in (key, str(key), int(key) if isinstance(key, str) and key.isdigit() else None):
        if k is not None and k in refs.refs:
            return k
    for k in (str(key), Path(str(key)).stem):
        if k in refs.aliases:
            return _AMBIGUOUS if refs.aliases[k] is None else refs.aliases[k]
    return None


class ImageFolder:
    """The image files under a folder, indexed once by file name, stem and COCO id."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise InputError(f"--images {self.root}: not a folder; give the folder that holds the images")
        self.by_name: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        self.by_number: dict[int, list[Path]] = {}
        for p in image_files(self.root):
            self.by_name.setdefault(p.name, []).append(p)
            self.by_stem.setdefault(p.stem, []).append(p)
            m = re.search(r"(?:^|_)(\d+)$", p.stem)  # COCO_val2014_000000391895, 000000391895
            if m:
                self.by_number.setdefault(int(m.group(1)), []).append(p)

    def find(self, names, files=(), number=None) -> tuple[Path | None, list[str]]:
        """The image of an entry: its reference file's own path first, then by name, then by COCO id."""
        tried = []
        for f in files:
            p = Path(f) if Path(f).is_absolute() else self.root / f
            tried.append(str(p))
            if p.is_file():
                return p, tried
        for index, keys in ((self.by_name, names), (self.by_stem, names), (self.by_number, [number])):
            for k in keys:
                if k is None:
                    continue
                hits = index.get(k, [])
                if len(hits) > 1:
                    raise InputError(f"--images {self.root}: {len(hits)} files match image {k!r} "
                                     f"({', '.join(map(str, hits[:3]))}); keep one")
                if hits:
                    return hits[0], tried
        tried += [f"{n}.jpg/.png/..." for n in names if n is not None]
        if number is not None:
            tried.append(f"*_{number:012d}.jpg (COCO id)")
        return None, tried


def _number(x) -> int | None:
    if isinstance(x, int) and not isinstance(x, bool):
        return x
    return int(x) if isinstance(x, str) and x.isdigit() else None


@dataclass
class Entry:
    id: object              # the candidate's image id, as in the candidates file
    caption: str
    refs: list[str]
    image: Path | None = None


def load_inputs(captions, refs, split=None, images=None) -> tuple[list[Entry], dict]:
    """Aligned entries (candidate order) and a summary of what was read."""
    cands = load_candidates(captions)
    references = load_references(refs, split)
    pairs = match(cands, references, captions)
    entries = [Entry(k, cands[k], references.refs[r]) for k, r in pairs.items()]
    unused = len(references.refs) - len(entries)
    if unused:
        log.warning("%d of %d images of %s have no candidate in %s: scoring the %d that have one (CIDEr's "
                    "document frequencies come from their references only, as in pycocoevalcap)",
                    unused, len(references.refs), refs, captions, len(entries))
    if images is not None:
        folder = ImageFolder(images)
        for e, rid in zip(entries, pairs.values()):
            names = list(dict.fromkeys([str(e.id), str(rid)]))
            e.image, tried = folder.find(names, references.files.get(rid, ()), _number(rid))
            if e.image is None:
                raise InputError(f"{refs}: image {rid!r} (candidate {e.id!r}) has no file under --images "
                                 f"{folder.root} (looked for {'; '.join(tried[:6])}). Put it there named after "
                                 "the image (e.g. image1.jpg, or COCO_val2014_000000391895.jpg for a COCO id), "
                                 f"point --images at the folder that holds it, or leave out the CLIP metrics "
                                 f"({COCO_ONLY})")
    summary = {"candidates": str(captions), "refs": str(refs), "refs_format": references.format,
               "split": split, "images": str(images) if images else None, "n_images": len(entries),
               "n_reference_images_without_candidate": unused}
    return entries, summary


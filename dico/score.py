"""`dico score`: the paper's metrics for anyone's captions, with no config file.

    dico score --captions FILE --refs FILE [--split test] [--images DIR] [--metrics bleu,...]
               [--clip PATH|ARCH:PRETRAINED] [--pac PATH] [--out m.json] [--per-caption scores.csv]
    dico score --correlation flickr8k.json --images DIR [--pac PATH] [--clip PATH]

Inputs are read in the layouts people already have:
  candidates  a COCO results list [{"image_id", "caption"}], or pacscore's {"image name": "caption"};
  references  pacscore's {"image name": [captions]}, a COCO captions_*.json, a Karpathy
              dataset_*.json (--split) or a dico split file (--split);
  images      --images DIR, found by the reference file's own file name (Karpathy filepath/filename,
              COCO file_name), by the image name (image1 -> image1.jpg / .png, as pacscore's
              compute_metrics.py does) or by a COCO id (COCO_val2014_000000391895.jpg).
Image ids are kept as they are (strings or ints). JSON object keys are strings, so a candidate id 42
also matches a reference named "42", and a candidate may also be named by its image's file name.

Metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE through pycocoevalcap (Java only; SPICE
also needs its CoreNLP jars), CLIP-S / RefCLIP-S with --clip and PAC-S / RefPAC-S with --pac,
with the official definitions and the schema defaults of evaluate.clip_s / evaluate.pac_s
(w = 2.5 and 2.0, prefix "A photo depicts "). A metric that cannot run is null, with its reason.
Never 0.

Human correlation (--correlation) follows pacscore's compute_correlations.py. Every human
judgement of a Flickr8k-Expert / Flickr8k-CF / Composite file in the flickr8k.json layout
({key: {"image_path", "ground_truth": [refs], "human_judgement": [{"caption", "rating"}]}}; NaN
ratings skipped) is scored as its own entry. Kendall tau-b and tau-c (x100, scipy.stats.kendalltau)
are then computed between each metric's per-entry values and the ratings.
"""
from __future__ import annotations

import csv
import hashlib
import io
import logging
import math
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json, write_json, write_text

log = logging.getLogger("dico")

METRICS = ("bleu", "meteor", "rouge", "cider", "spice", "clip-s", "refclip-s", "pac-s", "refpac-s")
COCO = ("bleu", "meteor", "rouge", "cider", "spice")
KEYS = {"bleu": ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4"), "meteor": ("METEOR",), "rouge": ("ROUGE-L",),
        "cider": ("CIDEr",), "spice": ("SPICE",), "clip-s": ("CLIP-S",), "refclip-s": ("RefCLIP-S",),
        "pac-s": ("PAC-S",), "refpac-s": ("RefPAC-S",)}
# the keys of the pipeline's metrics JSONs, in the order of the paper's tables (BLEU-1 first, as pacscore prints)
TABLE = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S")
# per-image columns of --per-caption, in the same order
PER_CAPTION = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE",
               "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CANDIDATE_FORMATS = ('a COCO results list [{"image_id": ..., "caption": "..."}, ...] or pacscore\'s '
                     '{"image name": "caption", ...}')
REFERENCE_FORMATS = ('pacscore\'s {"image name": ["caption", ...]}, a COCO captions_*.json '
                     '({"annotations": [{"image_id", "caption"}]}), a Karpathy dataset_*.json '
                     '({"images": [{"filename", "sentences": [{"raw"}]}]}) or a dico split file')
COCO_ONLY = "--metrics bleu,meteor,rouge,cider,spice"


class ScoreError(ValueError):
    """Bad input: the message names the file, the entry and the fix."""


# ----------------------------------------------------------------------------------------------
# inputs

def _is_id(x) -> bool:
    return isinstance(x, (int, str)) and not isinstance(x, bool)


def load_candidates(path: str | Path) -> dict:
    """{image id: caption} from a COCO results list or pacscore's {name: caption}."""
    path = Path(path)
    data = read_json(path)
    out: dict = {}
    if isinstance(data, list):
        for n, item in enumerate(data):
            if not (isinstance(item, dict) and _is_id(item.get("image_id")) and isinstance(item.get("caption"), str)):
                raise ScoreError(f"{path}: entry [{n}] is not an {{\"image_id\": int or str, \"caption\": str}} "
                                 f"object ({item!r:.100}); give {CANDIDATE_FORMATS}")
            if item["image_id"] in out:
                raise ScoreError(f"{path}: entry [{n}]: image_id {item['image_id']!r} has a second caption; "
                                 "keep one caption per image")
            out[item["image_id"]] = item["caption"]
    elif isinstance(data, dict) and not _looks_like_references(data):
        for key, caption in data.items():
            if not isinstance(caption, str):
                hint = " (a list: is this the references file? pass it as --refs)" if isinstance(caption, list) else ""
                raise ScoreError(f"{path}: entry {key!r} is a {type(caption).__name__}, not a caption string"
                                 f"{hint}; give {CANDIDATE_FORMATS}")
            out[key] = caption
    else:
        what = "a references file" if isinstance(data, dict) else f"a JSON {type(data).__name__}"
        raise ScoreError(f"{path}: unknown candidates format ({what}); give {CANDIDATE_FORMATS}")
    if not out:
        raise ScoreError(f"{path}: no captions in it; give {CANDIDATE_FORMATS}")
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

    def alias(self, name: str, image_id) -> None:
        # a name shared by two images is ambiguous: remember that, so a candidate using it fails clearly
        if name in self.aliases and self.aliases[name] != image_id:
            self.aliases[name] = None
        else:
            self.aliases[name] = image_id


def _captions(path: Path, where: str, caps) -> list[str]:
    if not isinstance(caps, list) or not caps or not all(isinstance(c, str) for c in caps):
        raise ScoreError(f"{path}: {where} needs a non-empty list of caption strings, got {caps!r:.100}; "
                         f"give {REFERENCE_FORMATS}")
    return list(caps)


def load_references(path: str | Path, split: str | None = None) -> References:
    """References in any of the formats of REFERENCE_FORMATS (see the module docstring)."""
    from .data import FORMAT

    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
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
        raise ScoreError(f"{path}: unknown references format ({what}); give {REFERENCE_FORMATS}")
    if not out.refs:
        raise ScoreError(f"{path}: no references" + (f" in split {split!r}; check --split" if split else ""))
    return out


def _split_file(path: Path, data: dict, split: str) -> References:
    if split not in data.get("splits", {}):
        raise ScoreError(f"{path}: no split {split!r} (has {', '.join(data.get('splits', {}))}); pass --split")
    out = References(path, f"dico split file ({split})", {})
    root = Path(data.get("image_root", ""))
    for n, r in enumerate(data["splits"][split]):
        if not isinstance(r, dict) or not _is_id(r.get("image_id")) or "file" not in r:
            raise ScoreError(f"{path}: splits.{split}[{n}] is malformed; regenerate it with `dico prepare-splits`")
        i = r["image_id"]
        out.refs[i] = _captions(path, f"splits.{split}[{n}].captions", r.get("captions"))
        out.files[i] = [r["file"], str(root / r["file"])]
        _alias_file(out, r["file"], i)
    return out


def _coco_captions(path: Path, data: dict) -> References:
    out = References(path, "COCO captions", {})
    for n, a in enumerate(data["annotations"]):
        if not (isinstance(a, dict) and _is_id(a.get("image_id")) and isinstance(a.get("caption"), str)):
            raise ScoreError(f"{path}: annotations[{n}] is not an {{\"image_id\", \"caption\": str}} object "
                             f"({a!r:.100}); give {REFERENCE_FORMATS}")
        out.refs.setdefault(a["image_id"], []).append(a["caption"])
    for im in data.get("images") or []:
        if isinstance(im, dict) and im.get("id") in out.refs and isinstance(im.get("file_name"), str):
            out.files[im["id"]] = [im["file_name"]]
            _alias_file(out, im["file_name"], im["id"])
    return out


def _karpathy(path: Path, data: dict, split: str | None) -> References:
    out = References(path, "Karpathy" + (f" ({split})" if split else ""), {})
    for n, im in enumerate(data["images"]):
        where = f"images[{n}]"
        if not isinstance(im, dict) or not isinstance(im.get("sentences"), list) or not (
                _is_id(im.get("cocoid")) or _is_id(im.get("imgid"))):
            raise ScoreError(f"{path}: {where} needs 'cocoid' (or 'imgid') and a 'sentences' list (the Karpathy "
                             "dataset_*.json schema)")
        if split is not None and im.get("split") != split and not (split == "train" and im.get("split") == "restval"):
            continue
        caps = [s.get("raw") if isinstance(s, dict) else None for s in im["sentences"]]
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
    """{candidate id: reference id}; every candidate needs a reference (else ScoreError)."""
    out, missing, ambiguous, taken = {}, [], [], {}
    for key in cands:
        rid = _lookup(key, refs)
        if rid is _AMBIGUOUS:
            ambiguous.append(key)
        elif rid is None:
            missing.append(key)
        elif rid in taken:
            raise ScoreError(f"{cand_path}: candidates {taken[rid]!r} and {key!r} are both captions of reference "
                             f"image {rid!r} of {refs.path}; keep one caption per image")
        else:
            out[key], taken[rid] = rid, key
    if ambiguous:
        raise ScoreError(f"{cand_path}: candidate {ambiguous[0]!r} names more than one image of {refs.path} "
                         "(two images share that file name); name candidates by image id")
    if missing:
        examples = ", ".join(repr(k) for k in list(refs.refs)[:3])
        raise ScoreError(f"{cand_path}: {len(missing)} of {len(cands)} candidates have no reference in {refs.path} "
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
            raise ScoreError(f"--images {self.root}: not a folder; give the folder that holds the images")
        self.by_name: dict[str, list[Path]] = {}
        self.by_stem: dict[str, list[Path]] = {}
        self.by_number: dict[int, list[Path]] = {}
        for p in sorted(self.root.rglob("*")):
            if p.suffix.lower() not in IMAGE_EXTENSIONS or not p.is_file():
                continue
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
                    raise ScoreError(f"--images {self.root}: {len(hits)} files match image {k!r} "
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
                raise ScoreError(f"{refs}: image {rid!r} (candidate {e.id!r}) has no file under --images "
                                 f"{folder.root} (looked for {'; '.join(tried[:6])}). Put it there named after "
                                 "the image (e.g. image1.jpg, or COCO_val2014_000000391895.jpg for a COCO id), "
                                 f"point --images at the folder that holds it, or leave out the CLIP metrics "
                                 f"({COCO_ONLY})")
    summary = {"candidates": str(captions), "refs": str(refs), "refs_format": references.format,
               "split": split, "images": str(images) if images else None, "n_images": len(entries),
               "n_reference_images_without_candidate": unused}
    return entries, summary


# ----------------------------------------------------------------------------------------------
# CLIP models

def clip_settings() -> dict:
    """CLIP-S and PAC-S settings: the schema defaults of evaluate.clip_s / evaluate.pac_s (the papers')."""
    from .config import schema

    props = schema()["properties"]["evaluate"]["properties"]
    return {"clip-s": dict(props["clip_s"]["default"]), "pac-s": dict(props["pac_s"]["default"])}


def load_scorer(spec: str, arch: str | None, flag: str, device: str):
    """--clip / --pac: a checkpoint file (OpenAI layout, or open_clip layout with --*-arch), or an
    open_clip ARCH:PRETRAINED whose weights are already in the local cache."""
    from .evaluator import load_evaluator

    path = Path(spec)
    if path.is_file():
        _refuse_lora(path, flag)
        return load_evaluator(path, format="open_clip" if arch else "openai", arch=arch, device=device)
    if ":" in spec and not path.exists():
        return _open_clip_cached(*spec.split(":", 1), flag=flag, device=device)
    raise ScoreError(f"{flag} {spec}: no such file. Give a checkpoint path (OpenAI's ViT-B-32.pt, the PAC-S "
                     "clip_ViT-B-32.pth) or an open_clip ARCH:PRETRAINED (e.g. ViT-B-32:openai) whose weights "
                     "are in the local cache")


def _refuse_lora(path: Path, flag: str) -> None:
    """PAC-S++ checkpoints (PAC++_clip_*.pth) hold LoRA adapters (lora_A / lora_B) inside a custom
    CLIP; that network is not rebuilt here, so say so instead of failing on missing keys."""
    import torch

    try:
        obj = torch.load(path, map_location="meta", weights_only=True)
    except Exception:
        return  # TorchScript or unreadable: load_evaluator gives the precise message
    sd = obj.get("state_dict", obj) if isinstance(obj, dict) else {}
    if isinstance(sd, dict) and any("lora_" in str(k) for k in sd):
        raise ScoreError(f"{flag} {path}: a PAC-S++ checkpoint (LoRA adapters), which dico score does not support; "
                         "use the PAC-S checkpoint clip_ViT-B-32.pth, or pacscore's compute_correlations_pac++.py")


def _cached_open_clip_file(arch: str, tag: str) -> str | None:
    """Where open_clip would load ARCH:TAG from, if that file is already in the local cache (no network)."""
    import os

    from open_clip.constants import HF_SAFE_WEIGHTS_NAME, HF_WEIGHTS_NAME
    from open_clip.pretrained import get_pretrained_cfg

    cfg = get_pretrained_cfg(arch, tag)
    if cfg.get("file"):
        return cfg["file"] if os.path.isfile(cfg["file"]) else None
    hub = cfg.get("hf_hub", "")
    if hub:  # 'org/model/' (default file name) or 'org/model/file.bin'; safetensors twins are tried first
        from huggingface_hub import try_to_load_from_cache

        repo, name = os.path.split(hub)
        name = name or HF_WEIGHTS_NAME
        twins = [HF_SAFE_WEIGHTS_NAME] if name == HF_WEIGHTS_NAME else (
            [name[:-4] + ".safetensors"] if name.endswith((".bin", ".pth")) else [])
        for n in twins + [name]:
            hit = try_to_load_from_cache(repo, n)
            if isinstance(hit, str):
                return hit
    if cfg.get("url"):
        p = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(cfg["url"])
        if p.is_file():
            return str(p)
    return None


def _open_clip_cached(arch: str, tag: str, flag: str, device: str):
    import open_clip

    from .evaluator import Evaluator

    if open_clip.get_model_config(arch) is None:
        raise ScoreError(f"{flag} {arch}:{tag}: {arch!r} is not an open_clip model (e.g. ViT-B-32, ViT-L-14)")
    if tag not in open_clip.list_pretrained_tags_by_model(arch):
        raise ScoreError(f"{flag} {arch}:{tag}: open_clip has no weights {tag!r} for {arch} (it has: "
                         f"{', '.join(open_clip.list_pretrained_tags_by_model(arch)) or 'none'})")
    if open_clip.get_model_config(arch).get("text_cfg", {}).get("hf_tokenizer_name"):
        raise ScoreError(f"{flag} {arch}:{tag}: its text tower uses a Hugging Face tokenizer, not CLIP's BPE, "
                         "which the CLIP-S/PAC-S definitions assume; pick a CLIP-BPE model")
    if _cached_open_clip_file(arch, tag) is None:
        raise ScoreError(f"{flag} {arch}:{tag}: the weights are not in the local cache, and dico score downloads "
                         "nothing. Fetch them once on a machine with internet (python -c \"import open_clip; "
                         f"open_clip.create_model('{arch}', pretrained='{tag}')\") and copy the Hugging Face "
                         "cache over, or pass a checkpoint file")
    model = open_clip.create_model(arch, pretrained=tag)
    return Evaluator(model.float(), name=f"open_clip:{arch}:{tag}").to(device)


# ----------------------------------------------------------------------------------------------
# scoring

def parse_metrics(text: str | None) -> list[str] | None:
    """--metrics a,b,c -> the names (None = every metric that can run)."""
    if text is None or text.strip() in ("", "all"):
        return None
    names = [m.strip().lower() for m in text.split(",") if m.strip()]
    unknown = [m for m in names if m not in METRICS]
    if unknown:
        raise ScoreError(f"--metrics: unknown {', '.join(map(repr, unknown))}; choose from {','.join(METRICS)}")
    return list(dict.fromkeys(names))


def compute(captions: list[str], refs: list[list[str]], images: list[Path] | None, wanted: list[str] | None,
            scorers: dict, spice_jar_dir=None, device: str = "cpu", batch_size: int = 64,
            workers: int = 0, reasons: dict | None = None) -> tuple[dict, dict, dict]:
    """(corpus, per_entry, reasons) over aligned lists. `scorers` maps 'clip-s'/'pac-s' to an
    Evaluator or to the reason it is missing. Every metric of `wanted` (None: all) that cannot run
    gets a reason; metrics not wanted get 'not requested'."""
    from .metrics import coco_scores

    chosen = list(METRICS) if wanted is None else wanted
    corpus, per, reasons = {}, {}, dict(reasons or {})
    coco = [m for m in COCO if m in chosen]
    if coco:
        if shutil.which("java") is None:
            from .metrics import JAVA_MISSING
            for m in coco:
                for k in KEYS[m]:
                    reasons[k] = "not computed: " + JAVA_MISSING
        else:
            c, p, notes = coco_scores(dict(enumerate(refs)), dict(enumerate(captions)), coco, spice_jar_dir)
            corpus.update(c)
            per.update(p)
            reasons.update(notes)  # "skipped: ..." / "failed: ..."
    for name in ("clip-s", "pac-s"):
        want = [m for m in (name, "ref" + name) if m in chosen]
        if not want:
            continue
        model = scorers.get(name, "no model given")
        why = "no images: pass --images DIR" if images is None else (model if isinstance(model, str) else None)
        if why:
            for m in want:
                reasons[KEYS[m][0]] = f"not computed: {why}"
            continue
        s = _clip_family(model, captions, refs, images, clip_settings()[name], device, batch_size, workers)
        for m in want:
            part = "score" if m == name else "ref_score"
            corpus[KEYS[m][0]], per[KEYS[m][0]] = s[part], s[part + "_per_caption"]
    for m in METRICS:
        for k in KEYS[m]:
            if k not in corpus and k not in reasons:
                reasons[k] = "not requested (--metrics)" if m not in chosen else "not computed"
    return corpus, per, reasons


def _clip_family(model, captions, refs, images, settings, device, batch_size, workers=0) -> dict:
    """CLIP-S / PAC-S and their Ref- variants (dico.evaluator.score_captions), each distinct image embedded once."""
    import torch

    from .evaluator import score_captions

    unique = list(dict.fromkeys(images))
    row = {p: n for n, p in enumerate(unique)}
    embs = embed_paths(model, unique, batch_size, device, workers)
    index = torch.tensor([row[p] for p in images], dtype=torch.long, device=embs.device)
    return score_captions(model, embs[index], captions, refs, w=settings["w"], prefix=settings["prefix"],
                          batch_size=256)


class _Images:
    """Decode + CLIP preprocessing of one image per item, in DataLoader workers. A file that will not
    decode comes back as its error message, so the main process can name it (a worker's exception
    would arrive wrapped in a traceback)."""

    def __init__(self, paths, size, mean, std):
        self.paths, self.size, self.mean, self.std = paths, size, mean, std

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        from .data import load_image
        from .evaluator import clip_preprocess

        try:
            return i, clip_preprocess(load_image(self.paths[i]), self.size, self.mean, self.std), None
        except (OSError, ValueError) as e:
            return i, None, str(e)


def embed_paths(model, paths: list[Path], batch_size: int = 64, device: str = "cpu", workers: int = 0):
    """L2-normalised image embeddings [N, D] of `model` (an Evaluator), batched on `device`; images are
    decoded by `workers` processes (decoding, not the GPU, is the bottleneck of CLIP scoring)."""
    import torch
    from torch.utils.data import DataLoader

    loader = DataLoader(_Images(paths, model.image_size, model.mean, model.std), batch_size=batch_size,
                        num_workers=workers, collate_fn=list, pin_memory=str(device).startswith("cuda"))
    out = []
    for batch in loader:
        broken = [err for _, x, err in batch if err]
        if broken:
            raise ScoreError(f"{broken[0]}. Replace the file, or remove its entry from the candidates")
        out.append(model.embed_images(torch.stack([x for _, x, _ in batch]).to(device), batch_size))
    return torch.cat(out)


def load_scorers(clip: str | None, pac: str | None, wanted: list[str] | None, device: str,
                 clip_arch: str | None = None, pac_arch: str | None = None) -> dict:
    """'clip-s' / 'pac-s' -> Evaluator, or the reason why there is none."""
    chosen = list(METRICS) if wanted is None else wanted
    out = {}
    for name, spec, arch, flag, what in (
            ("clip-s", clip, clip_arch, "--clip", "OpenAI CLIP ViT-B/32 (ViT-B-32.pt) or ARCH:PRETRAINED"),
            ("pac-s", pac, pac_arch, "--pac", "the PAC-S checkpoint clip_ViT-B-32.pth")):
        if name not in chosen and "ref" + name not in chosen:
            continue
        out[name] = (load_scorer(spec, arch, flag, device) if spec else
                     f"needs {flag} PATH ({what})")
    return out


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def score_files(captions, refs, *, split=None, images=None, metrics=None, clip=None, pac=None,
                clip_arch=None, pac_arch=None, spice_jar_dir=None, device="cpu", batch_size=64,
                workers=0) -> dict:
    """Everything `dico score` writes to --out (see the module docstring)."""
    from .io import provenance

    t0 = time.time()
    wanted = parse_metrics(metrics) if isinstance(metrics, str) or metrics is None else list(metrics)
    entries, summary = load_inputs(captions, refs, split, images)
    scorers = load_scorers(clip, pac, wanted, device, clip_arch, pac_arch)
    corpus, per, reasons = compute([e.caption for e in entries], [e.refs for e in entries],
                                   [e.image for e in entries] if images else None, wanted, scorers,
                                   spice_jar_dir, device, batch_size, workers)
    settings = {"metrics": wanted or "all", "clip": clip, "pac": pac, "clip_arch": clip_arch,
                "pac_arch": pac_arch, **{k.replace("-", "_"): v for k, v in clip_settings().items()},
                "spice_jar_dir": spice_jar_dir}
    inputs = {k: {"path": str(p), "sha256": _sha256(p)} for k, p in (("captions", captions), ("refs", refs))}
    return {"tool": "dico score", **summary,
            "metrics": {k: corpus.get(k) for k in TABLE},
            "extra": {k: corpus[k] for k in ("BLEU-2", "BLEU-3") if k in corpus},
            "reasons": {k: v for k, v in reasons.items() if k in TABLE or k in ("BLEU-2", "BLEU-3")},
            "per_caption": {"ids": [e.id for e in entries], "captions": [e.caption for e in entries], **per},
            "provenance": provenance(settings, seed=None, device=device, wall_time_s=time.time() - t0,
                                     inputs=inputs)}


# ----------------------------------------------------------------------------------------------
# outputs

def format_table(metrics: dict, reasons: dict, keys=TABLE) -> str:
    """The metrics in the order of the paper's tables: raw value, x100 (as papers print), or the reason."""
    width = max(len(k) for k in keys)
    lines = [f"{'metric':<{width}}  {'value':>8}  {'x100':>6}"]
    for k in keys:
        v = metrics.get(k)
        if v is None:
            lines.append(f"{k:<{width}}  {'--':>8}  {'--':>6}  {reasons.get(k, 'not computed')}")
        else:
            lines.append(f"{k:<{width}}  {v:>8.4f}  {100 * v:>6.1f}")
    return "\n".join(lines)


def per_caption_csv(result: dict) -> str:
    """One row per image: its id, the candidate, and every metric that has a per-image value."""
    per = result["per_caption"]
    cols = [k for k in ("rating", *PER_CAPTION) if k in per]  # rating: --correlation's human judgement
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["image", "caption", *cols] if "rating" in per else ["image_id", "caption", *cols])
    for n, (i, c) in enumerate(zip(per["ids"], per["captions"])):
        w.writerow([i, c, *(repr(float(per[k][n])) for k in cols)])
    return buf.getvalue()


def write_outputs(result: dict, out=None, per_caption=None) -> None:
    if out:
        blob = {k: v for k, v in result.items() if k != "per_caption"}
        write_json(out, blob)
    if per_caption:
        write_text(per_caption, per_caption_csv(result))


# ----------------------------------------------------------------------------------------------
# human correlation

@dataclass
class Judgement:
    image: str              # image_path of the file
    refs: list[str]
    caption: str
    rating: float


def load_judgements(path: str | Path) -> tuple[list[Judgement], int]:
    """Entries of a flickr8k.json-style file, in file order (pacscore's data/dataset.py reads them the
    same way: whitespace collapsed in candidates and references, NaN ratings skipped). Returns the
    judgements and the number of NaN ratings skipped."""
    path = Path(path)
    data = read_json(path)
    layout = ('{"key": {"image_path": "...", "ground_truth": ["ref", ...], "human_judgement": '
              '[{"caption": "...", "rating": number}, ...]}, ...} (pacscore\'s flickr8k.json / '
              'crowdflower_flickr8k.json)')
    if not isinstance(data, dict) or not data:
        raise ScoreError(f"{path}: unknown human-judgement format; expected {layout}")
    out, nan = [], 0
    for key, item in data.items():
        if not (isinstance(item, dict) and isinstance(item.get("image_path"), str)
                and isinstance(item.get("human_judgement"), list)):
            raise ScoreError(f"{path}: entry {key!r} lacks 'image_path' or a 'human_judgement' list; expected {layout}")
        refs = [" ".join(r.split()) for r in _captions(path, f"entry {key!r}.ground_truth", item.get("ground_truth"))]
        for n, h in enumerate(item["human_judgement"]):
            where = f"entry {key!r}.human_judgement[{n}]"
            if not isinstance(h, dict) or not isinstance(h.get("caption"), str):
                raise ScoreError(f"{path}: {where} needs a 'caption' string; expected {layout}")
            try:
                rating = float(h.get("rating"))
            except (TypeError, ValueError):
                raise ScoreError(f"{path}: {where}: rating {h.get('rating')!r} is not a number") from None
            if math.isnan(rating):
                nan += 1
                continue
            out.append(Judgement(item["image_path"], refs, " ".join(h["caption"].split()), rating))
    if not out:
        raise ScoreError(f"{path}: no human judgements with a rating; expected {layout}")
    return out, nan


def kendall(values, ratings) -> dict:
    """Kendall tau-b and tau-c (x100) of one metric's values against the human ratings (pacscore's
    compute_correlations.py uses scipy.stats.kendalltau with variant 'b' and 'c')."""
    from scipy.stats import kendalltau

    return {"tau_b": 100 * float(kendalltau(values, ratings, variant="b")[0]),
            "tau_c": 100 * float(kendalltau(values, ratings, variant="c")[0])}


def correlation_files(path, *, images=None, metrics=None, clip=None, pac=None, clip_arch=None, pac_arch=None,
                      spice_jar_dir=None, device="cpu", batch_size=64, workers=0) -> dict:
    from .io import provenance

    t0 = time.time()
    wanted = parse_metrics(metrics) if isinstance(metrics, str) or metrics is None else list(metrics)
    judgements, nan = load_judgements(path)
    paths = None
    if images is not None:
        folder, found = ImageFolder(images), {}
        for j in judgements:
            if j.image not in found:
                found[j.image], tried = folder.find([Path(j.image).name, Path(j.image).stem],
                                                    [Path(j.image).name, j.image])
                if found[j.image] is None:
                    raise ScoreError(f"{path}: image_path {j.image!r} has no file under --images {folder.root} "
                                     f"(looked for {'; '.join(tried[:4])}); give the folder holding the Flickr8k "
                                     f"images, or leave out the CLIP metrics ({COCO_ONLY})")
        paths = [found[j.image] for j in judgements]
    scorers = load_scorers(clip, pac, wanted, device, clip_arch, pac_arch)
    _, per, reasons = compute([j.caption for j in judgements], [j.refs for j in judgements], paths, wanted,
                              scorers, spice_jar_dir, device, batch_size, workers)
    ratings = [j.rating for j in judgements]
    taus = {k: kendall(per[k], ratings) for k in PER_CAPTION if k in per}
    settings = {"metrics": wanted or "all", "clip": clip, "pac": pac, "clip_arch": clip_arch, "pac_arch": pac_arch,
                **{k.replace("-", "_"): v for k, v in clip_settings().items()}}
    return {"tool": "dico score --correlation", "judgements": str(path), "images": str(images) if images else None,
            "n_judgements": len(judgements), "n_nan_skipped": nan, "correlation": taus,
            "reasons": {k: v for k, v in reasons.items() if k not in taus},
            "per_caption": {"ids": [j.image for j in judgements], "captions": [j.caption for j in judgements],
                            "rating": ratings, **per},
            "provenance": provenance(settings, seed=None, device=device, wall_time_s=time.time() - t0,
                                     inputs={"judgements": {"path": str(path), "sha256": _sha256(path)}})}


def format_correlation(result: dict) -> str:
    lines = [f"{'metric':<10}  {'tau-b':>7}  {'tau-c':>7}   ({result['n_judgements']} judgements, "
             f"{result['n_nan_skipped']} NaN ratings skipped)"]
    for k in PER_CAPTION:
        if k in result["correlation"]:
            t = result["correlation"][k]
            lines.append(f"{k:<10}  {t['tau_b']:>7.3f}  {t['tau_c']:>7.3f}")
        elif k in result["reasons"] and not result["reasons"][k].startswith("not requested"):
            lines.append(f"{k:<10}  {'--':>7}  {'--':>7}   {result['reasons'][k]}")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# command line

def register(sub) -> None:
    p = sub.add_parser("score", help="score anyone's captions (pacscore / pycocoevalcap drop-in; no config)",
                       description=__doc__.split("\n\n")[0])
    p.add_argument("--captions", help="candidates: COCO results list or pacscore's {name: caption}")
    p.add_argument("--refs", help="references: pacscore {name: [captions]}, COCO captions_*.json, Karpathy "
                                  "dataset_*.json or a dico split file")
    p.add_argument("--split", help="split of a Karpathy or dico split file (Karpathy: all images when omitted; "
                                   "split file: test)")
    p.add_argument("--images", help="folder of the images (needed by CLIP-S and PAC-S)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} (default: all that can run)")
    p.add_argument("--clip", help="CLIP-S model: OpenAI ViT-B-32.pt (or any OpenAI-layout checkpoint), or "
                                  "open_clip ARCH:PRETRAINED with cached weights")
    p.add_argument("--clip-arch", help="open_clip architecture of a --clip file in open_clip layout")
    p.add_argument("--pac", help="PAC-S model: the PAC-S checkpoint clip_ViT-B-32.pth")
    p.add_argument("--pac-arch", help="open_clip architecture of a --pac file in open_clip layout "
                                      "(ViT-L-14 for PAC-S's openClip_ViT-L-14.pth)")
    p.add_argument("--spice-jar-dir", help="folder with the Stanford CoreNLP 3.6.0 jars SPICE needs")
    p.add_argument("--correlation", metavar="FILE",
                   help="human judgements in pacscore's flickr8k.json layout: print Kendall tau-b/tau-c per metric")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward pass")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: half the CPU cores, at most 8; 0 = none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--out", help="metrics JSON (a 'metrics' object with the pipeline's keys, and provenance)")
    p.add_argument("--per-caption", help="CSV with one row per image (per judgement with --correlation)")
    p.set_defaults(fn=cmd_score)


def _workers(n: int | None) -> int:
    import os

    return min(8, (os.cpu_count() or 2) // 2) if n is None else max(0, n)


def cmd_score(args) -> None:
    import torch

    from .runtime import select_device

    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    common = dict(images=args.images, metrics=args.metrics, clip=args.clip, pac=args.pac, clip_arch=args.clip_arch,
                  pac_arch=args.pac_arch, spice_jar_dir=args.spice_jar_dir, device=device,
                  batch_size=args.batch_size, workers=_workers(args.workers))
    if args.correlation:
        if args.captions or args.refs:
            raise ScoreError("--correlation reads candidates, references and ratings from its own file; "
                             "drop --captions/--refs")
        result = correlation_files(args.correlation, **common)
        print(format_correlation(result))
    else:
        if not (args.captions and args.refs):
            raise ScoreError("give --captions FILE and --refs FILE (or --correlation FILE)")
        result = score_files(args.captions, args.refs, split=args.split, **common)
        print(format_table(result["metrics"], result["reasons"]))
    write_outputs(result, args.out, args.per_caption)

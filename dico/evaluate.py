"""Scoring generated captions: every number of the paper's tables for one run and split.

BLEU-1..4, METEOR, ROUGE-L, CIDEr-D (and SPICE where its jars exist) through pycocoevalcap's PTB
tokenizer and scorers; CLIP-S / RefCLIP-S and PAC-S / RefPAC-S with the official definitions
(prefix "A photo depicts ", w * max(cos, 0), harmonic mean with the best reference cosine);
vocabulary and fluency statistics. Usable inside the DAG and on anyone's COCO-format results file.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .data import ImageRecord, load_image
from .io import read_json

METRIC_KEYS = ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE", "CLIP-S", "RefCLIP-S", "PAC-S", "RefPAC-S")


def load_captions(path: str | Path) -> dict[int, str]:
    """COCO result format `[{"image_id": int, "caption": str}, ...]` -> {image_id: caption}."""
    path = Path(path)
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {{'image_id', 'caption'}} objects (COCO result "
                         f"format), got {type(data).__name__}")
    out = {}
    for n, item in enumerate(data):
        if not isinstance(item, dict) or "image_id" not in item or not isinstance(item.get("caption"), str):
            raise ValueError(f"{path}: entry {n} is not an {{'image_id': int, 'caption': str}} object: {item!r:.120}")
        if item["image_id"] in out:
            raise ValueError(f"{path}: entry {n}: image_id {item['image_id']} appears twice")
        out[item["image_id"]] = item["caption"]
    return out


def load_references(path: str | Path, split: str | None = None) -> dict[int, list[str]]:
    """References from a normalised split file, a Karpathy file or a COCO annotations file."""
    from .data import FORMAT, load_split

    path = Path(path)
    data = read_json(path)
    if isinstance(data, dict) and data.get("format") == FORMAT:
        return {r.image_id: list(r.captions) for r in load_split(path, split or "test")}
    refs: dict[int, list[str]] = {}
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions_*.json
        for n, a in enumerate(data["annotations"]):
            if not isinstance(a, dict) or "image_id" not in a or not isinstance(a.get("caption"), str):
                raise ValueError(f"{path}: annotations[{n}] is not an {{'image_id': int, 'caption': str}} "
                                 f"object: {a!r:.120}")
            refs.setdefault(int(a["image_id"]), []).append(a["caption"])
    elif isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy dataset_coco.json
        for n, im in enumerate(data["images"]):
            where = f"{path}: images[{n}]"
            if not isinstance(im, dict) or not isinstance(im.get("sentences"), list) or (
                    "cocoid" not in im and "imgid" not in im):
                raise ValueError(f"{where} needs 'cocoid' (or 'imgid') and a 'sentences' list "
                                 "(Karpathy dataset_coco.json schema)")
            if split is not None and im.get("split") != split and not (
                    split == "train" and im.get("split") == "restval"):
                continue
            caps = [sent.get("raw") if isinstance(sent, dict) else None for sent in im["sentences"]]
            if not all(isinstance(c, str) for c in caps):
                bad = next(m for m, c in enumerate(caps) if not isinstance(c, str))
                raise ValueError(f"{where}.sentences[{bad}] has no 'raw' caption string")
            refs[int(im.get("cocoid", im.get("imgid")))] = caps
    else:
        raise ValueError(f"{path}: unknown reference format; give a dico split file, a Karpathy "
                         "dataset_*.json or a COCO captions_*.json annotations file")
    if not refs:
        raise ValueError(f"{path}: no references" + (f" for split {split!r}" if split else "")
                         + "; check --split")
    return refs


@torch.no_grad()
def embed_images(evaluator, paths: list[Path], batch_size: int = 64, device: str = "cpu",
                 split: str | None = None, progress: bool = True, skip_broken: bool = False,
                 log=None) -> torch.Tensor:
    """L2-normalised image embeddings, decoded with the evaluator's own preprocessing.

    An image that cannot be read raises (naming the file and split) unless `skip_broken`
    (features.skip_broken_images): then its row is NaN, so no score can silently use it;
    `skipped_rows` lists such rows and `score` leaves those images out of every metric.
    """
    from tqdm import tqdm

    if not paths:
        raise ValueError("no images to embed" + (f" (split {split!r} is empty)" if split else ""))
    out, broken = [], []
    for lo in tqdm(range(0, len(paths), batch_size), desc="image embeddings", unit="batch",
                   disable=not progress, mininterval=2.0):
        pixels, ok = [], []
        for i, p in enumerate(paths[lo:lo + batch_size], start=lo):
            try:
                pixels.append(evaluator.preprocess(load_image(p, split)))
                ok.append(i - lo)
            except (OSError, ValueError):
                if not skip_broken:
                    raise
                broken.append(i)
        embs = torch.full((len(paths[lo:lo + batch_size]), int(evaluator.embed_dim)), float("nan"))
        if pixels:
            embs[ok] = evaluator.embed_images(torch.stack(pixels).to(device)).float().cpu()
        out.append(embs)
    if broken:
        if len(broken) == len(paths) and len(paths) > 1:
            raise ValueError(f"none of the {len(paths)} images (e.g. {paths[0]}) could be read; check "
                             "data.image_root (or --images)")
        (log or print)(f"skipped {len(broken)} of {len(paths)} images that could not be read "
                       f"(features.skip_broken_images): {[str(paths[i]) for i in broken[:10]]}")
    return torch.cat(out)


def skipped_rows(image_embs: torch.Tensor) -> list[int]:
    """Rows of an embedding matrix that `embed_images(skip_broken=True)` left NaN."""
    return torch.isnan(image_embs.float()).any(dim=-1).nonzero().flatten().tolist()


def score(captions: dict[int, str], records: list[ImageRecord], spec: dict, evaluators: dict,
          image_embs: dict, train_captions: list[str] | None = None, grammar=None) -> dict:
    """The `metrics`, `reasons` and `diversity` blocks of a metrics JSON.

    `records` define the images and references; every record needs a caption. `evaluators` and
    `image_embs` are keyed by clip_models name (embeddings aligned with `records`). `grammar`: the
    demo's `dico.demo.grammatical` on a demo set (diversity.fluent_pct), else None.
    """
    from .evaluator import score_captions
    from .metrics import coco_metrics, diversity

    if not records:
        raise ValueError("no images to score: the split (or the images that have captions, with "
                         "--subset) is empty")
    missing = [r.image_id for r in records if r.image_id not in captions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} images have no caption (first: {missing[:5]})")
    # Images that could not be read (features.skip_broken_images: NaN embedding rows) are left out of
    # EVERY metric, so all numbers of the split describe the same images; the JSON lists them.
    skip = sorted({i for embs in image_embs.values() for i in skipped_rows(embs)})
    if skip:
        if len(skip) == len(records):
            raise ValueError(f"all {len(records)} images were skipped as unreadable: nothing to score")
        keep = [i for i in range(len(records)) if i not in set(skip)]
        skipped_ids = [records[i].image_id for i in skip]
        records = [records[i] for i in keep]
        image_embs = {name: embs[keep] for name, embs in image_embs.items()}
    else:
        skipped_ids = []
    refs = {r.image_id: list(r.captions) for r in records}
    cands = {r.image_id: captions[r.image_id] for r in records}
    coco, reasons = coco_metrics(refs, cands, meteor=spec["meteor"], spice_jar_dir=spec.get("spice_jar_dir"))
    metrics = {k: coco.get(k) for k in ("BLEU-1", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")}
    extra = {k: v for k, v in coco.items() if k not in metrics}
    cand_list = [cands[r.image_id] for r in records]
    ref_list = [refs[r.image_id] for r in records]
    for name, key in (("CLIP-S", "clip_s"), ("PAC-S", "pac_s")):
        cfg = spec[key]
        s = score_captions(evaluators[cfg["model"]], image_embs[cfg["model"]], cand_list, ref_list,
                           w=cfg["w"], prefix=cfg["prefix"])
        metrics[name], metrics[f"Ref{name}"] = float(s["score"]), float(s["ref_score"])
    for k in METRIC_KEYS:
        if metrics.get(k) is None and k not in reasons:
            reasons[k] = "not computed"
    if skipped_ids:
        reasons["skipped_images"] = (f"{len(skipped_ids)} unreadable images left out of every metric "
                                     "(features.skip_broken_images)")
    return {"metrics": {k: metrics.get(k) for k in METRIC_KEYS}, "reasons": reasons,
            "extra": extra, "diversity": diversity(cand_list, train_captions or [], grammar),
            "n_scored": len(records), "skipped_images": skipped_ids}

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
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):  # COCO captions_*.json
        refs: dict[int, list[str]] = {}
        for a in data["annotations"]:
            refs.setdefault(int(a["image_id"]), []).append(a["caption"])
        return refs
    if isinstance(data, dict) and isinstance(data.get("images"), list):  # Karpathy dataset_coco.json
        return {int(im.get("cocoid", im.get("imgid"))): [s["raw"] for s in im["sentences"]]
                for im in data["images"] if split is None or im["split"] == split}
    raise ValueError(f"{path}: unknown reference format; give a dico split file, a Karpathy "
                     "dataset_*.json or a COCO captions_*.json annotations file")


@torch.no_grad()
def embed_images(evaluator, paths: list[Path], batch_size: int = 64, device: str = "cpu",
                 split: str | None = None, progress: bool = True) -> torch.Tensor:
    """L2-normalised image embeddings, decoded with the evaluator's own preprocessing."""
    from tqdm import tqdm

    out = []
    for lo in tqdm(range(0, len(paths), batch_size), desc="image embeddings", unit="batch",
                   disable=not progress, mininterval=2.0):
        pixels = torch.stack([evaluator.preprocess(load_image(p, split)) for p in paths[lo:lo + batch_size]])
        out.append(evaluator.embed_images(pixels.to(device)).float().cpu())
    return torch.cat(out)


def score(captions: dict[int, str], records: list[ImageRecord], spec: dict, evaluators: dict,
          image_embs: dict, train_captions: list[str] | None = None) -> dict:
    """The `metrics`, `reasons` and `diversity` blocks of a metrics JSON.

    `records` define the images and references; every record needs a caption. `evaluators` and
    `image_embs` are keyed by clip_models name (embeddings aligned with `records`).
    """
    from .evaluator import score_captions
    from .metrics import coco_metrics, diversity

    missing = [r.image_id for r in records if r.image_id not in captions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} images have no caption (first: {missing[:5]})")
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
    return {"metrics": {k: metrics.get(k) for k in METRIC_KEYS}, "reasons": reasons,
            "extra": extra, "diversity": diversity(cand_list, train_captions or [])}

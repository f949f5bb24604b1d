"""Human correlation of the metrics: Kendall tau-b and tau-c against human judgements (`dico score
--correlation`), following pacscore's compute_correlations.py.

Every human judgement of a Flickr8k-Expert / Flickr8k-CF / Composite file in the flickr8k.json layout
({key: {"image_path", "ground_truth": [refs], "human_judgement": [{"caption", "rating"}]}}; NaN
ratings skipped) is scored as its own entry; Kendall tau-b and tau-c (x100, scipy.stats.kendalltau)
are then computed between each metric's per-entry values and the ratings.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

from ..io import InputError, provenance, read_json, sha256_file
from .inputs import COCO_ONLY, ImageFolder, _captions
from .keys import KEYS
from .score_files import clip_scorers, clip_settings, load_scorers, parse_metrics, refuse_what_cannot_run
from .scoring import compute


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
        raise InputError(f"{path}: unknown human-judgement format; expected {layout}")
    out, nan = [], 0
    for key, item in data.items():
        if not (isinstance(item, dict) and isinstance(item.get("image_path"), str)
                and isinstance(item.get("human_judgement"), list)):
            raise InputError(f"{path}: entry {key!r} lacks 'image_path' or a 'human_judgement' list; expected {layout}")
        refs = [" ".join(r.split()) for r in _captions(path, f"entry {key!r}.ground_truth", item.get("ground_truth"))]
        for n, h in enumerate(item["human_judgement"]):
            where = f"entry {key!r}.human_judgement[{n}]"
            if not isinstance(h, dict) or not isinstance(h.get("caption"), str):
                raise InputError(f"{path}: {where} needs a 'caption' string; expected {layout}")
            try:
                rating = float(h.get("rating"))
            except (TypeError, ValueError):
                raise InputError(f"{path}: {where}: rating {h.get('rating')!r} is not a number") from None
            if math.isnan(rating):
                nan += 1
                continue
            out.append(Judgement(item["image_path"], refs, " ".join(h["caption"].split()), rating))
    if not out:
        raise InputError(f"{path}: no human judgements with a rating; expected {layout}")
    return out, nan


def kendall(values, ratings) -> dict:
    """Kendall tau-b and tau-c (x100) of one metric's values against the human ratings (pacscore's
    compute_correlations.py uses scipy.stats.kendalltau with variant 'b' and 'c')."""
    from scipy.stats import kendalltau

    return {"tau_b": 100 * float(kendalltau(values, ratings, variant="b")[0]),
            "tau_c": 100 * float(kendalltau(values, ratings, variant="c")[0])}


def correlation_files(path, *, images=None, metrics=None, clip=None, pac=None, clip_arch=None, pac_arch=None,
                      spice_jar_dir=None, device="cpu", batch_size=64, workers=0, skip_broken=False) -> dict:
    t0 = time.time()
    wanted = parse_metrics(metrics) if isinstance(metrics, str) or metrics is None else list(metrics)
    refuse_what_cannot_run(wanted, images, clip, pac, spice_jar_dir)
    judgements, nan = load_judgements(path)
    paths = None
    if images is not None:
        folder, found = ImageFolder(images), {}
        for j in judgements:
            if j.image not in found:
                found[j.image], tried = folder.find([Path(j.image).name, Path(j.image).stem],
                                                    [Path(j.image).name, j.image])
                if found[j.image] is None:
                    raise InputError(f"{path}: image_path {j.image!r} has no file under --images {folder.root} "
                                     f"(looked for {'; '.join(tried[:4])}); give the folder holding the Flickr8k "
                                     f"images, or leave out the CLIP metrics ({COCO_ONLY})")
        paths = [found[j.image] for j in judgements]
    scorers = load_scorers(clip, pac, wanted, device, clip_arch, pac_arch)
    clip_in, broken = clip_scorers(scorers, paths, device, batch_size, workers, skip_broken)
    if broken:  # judgements of an unreadable image are left out of every metric
        keep = [n for n, p in enumerate(paths) if p not in broken]
        judgements = [judgements[n] for n in keep]
        clip_in = {k: v if isinstance(v, str) else (v[0], v[1][keep], v[2]) for k, v in clip_in.items()}
    _, per, reasons = compute([j.caption for j in judgements], [j.refs for j in judgements], wanted, clip_in,
                              spice_jar_dir)
    ratings = [j.rating for j in judgements]
    taus = {k: kendall(per[k], ratings) for k in KEYS if k in per}
    settings = {"metrics": wanted or "all", "clip": clip, "pac": pac, "clip_arch": clip_arch, "pac_arch": pac_arch,
                **{k.replace("-", "_"): v for k, v in clip_settings().items()}}
    return {"tool": "dico score --correlation", "judgements": str(path), "images": str(images) if images else None,
            "n_judgements": len(judgements), "n_nan_skipped": nan, "correlation": taus,
            "reasons": {k: v for k, v in reasons.items() if k not in taus},
            "per_caption": {"ids": [j.image for j in judgements], "captions": [j.caption for j in judgements],
                            "rating": ratings, **per},
            "provenance": provenance(settings, seed=None, device=device, wall_time_s=time.time() - t0,
                                     inputs={"judgements": {"path": str(path), "sha256": sha256_file(path)}})}


def format_correlation(result: dict) -> str:
    lines = [f"{'metric':<10}  {'tau-b':>7}  {'tau-c':>7}   ({result['n_judgements']} judgements, "
             f"{result['n_nan_skipped']} NaN ratings skipped)"]
    for k in KEYS:
        if k in result["correlation"]:
            t = result["correlation"][k]
            lines.append(f"{k:<10}  {t['tau_b']:>7.3f}  {t['tau_c']:>7.3f}")
        elif k in result["reasons"] and not result["reasons"][k].startswith("not requested"):
            lines.append(f"{k:<10}  {'--':>7}  {'--':>7}   {result['reasons'][k]}")
    return "\n".join(lines)


"""The metrics JSON of a run's captions on one split: the pipeline's `evaluate` step (`dico evaluate`).

Every number of the paper's tables (`dico.metrics.scoring`) plus diversity statistics, for the
images of a split file (inside the pipeline, with the image embeddings `cache_embeddings` wrote) or
of any references file and image folder (outside it). Written with provenance: the settings, the
training run's seed and selected step (read from its checkpoint), versions, device, time.
"""
from __future__ import annotations

import time
from pathlib import Path

from ..checkpoint import run_provenance
from ..data import ImageRecord, load_split
from ..embeddings import embed_images, load_embeddings, skipped_rows
from ..gpu_slots import held as gpu_slots_held
from ..io import InputError, Outputs, provenance
from .coco import ptb_prefetch, require_java
from .diversity import diversity
from .inputs import ImageFolder, _lookup, _number, load_candidates, load_references
from .keys import EXTRA_KEYS, TABLE_KEYS
from .scoring import compute


def score_split(captions: dict, records: list[ImageRecord], spec: dict, evaluators: dict, image_embs: dict,
                train_captions: list[str] | None = None, grammar=None) -> dict:
    """The `metrics`, `reasons`, `extra` and `diversity` blocks of a metrics JSON.

    `records` define the images and references; every record needs a caption. `evaluators` and
    `image_embs` are keyed by clip_models name (embeddings aligned with `records`). `grammar`: a
    predicate text -> bool for diversity.fluent_pct (the demo's `grammatical` on a demo set), else None.
    """
    require_java()
    if not records:
        raise ValueError("no images to score: the split (or the images that have captions, with "
                         "--subset) is empty")
    missing = [r.image_id for r in records if r.image_id not in captions]
    if missing:
        raise ValueError(f"{len(missing)} of {len(records)} images have no caption (first: {missing[:5]})")
    # Images that could not be read (features.skip_broken_images: NaN embedding rows) are left out of
    # EVERY metric, so all numbers of the split describe the same images; the JSON lists them.
    skip = sorted({i for embs in image_embs.values() for i in skipped_rows(embs)})
    if len(skip) == len(records):
        raise ValueError(f"all {len(records)} images were skipped as unreadable: nothing to score")
    keep = [i for i in range(len(records)) if i not in set(skip)]
    skipped_ids = [records[i].image_id for i in skip]
    records = [records[i] for i in keep]
    cand_list = [captions[r.image_id] for r in records]
    ref_list = [list(r.captions) for r in records]
    clip = {name: (evaluators[spec[key]["model"]], image_embs[spec[key]["model"]][keep], spec[key])
            for name, key in (("clip-s", "clip_s"), ("pac-s", "pac_s"))}
    corpus, _, reasons = compute(cand_list, ref_list, clip=clip, spice_jar_dir=spec.get("spice_jar_dir"),
                                 meteor=spec["meteor"], spice_cache=spec.get("spice_cache"))
    reasons = {k: v for k, v in reasons.items() if k in TABLE_KEYS}
    if skipped_ids:
        reasons["skipped_images"] = (f"{len(skipped_ids)} unreadable images left out of every metric "
                                     "(features.skip_broken_images)")
    return {"metrics": {k: corpus.get(k) for k in TABLE_KEYS}, "reasons": reasons,
            "extra": {k: corpus[k] for k in EXTRA_KEYS if k in corpus},
            "diversity": diversity(cand_list, train_captions or [], grammar),
            "n_scored": len(records), "skipped_images": skipped_ids}


def evaluate_jobs(jobs: list[dict], spec: dict, evaluators: dict, *, splits_json=None, refs=None, images=None,
                  subset: bool = False, embeddings: dict | None = None, skip_broken: bool = False, grammar=None,
                  device: str = "cpu", log=print) -> None:
    """Score every job ({"run", "split", "captions", "out", "model_checkpoint"}) and write its metrics JSON.

    Inside the pipeline `splits_json` gives each split's images and references and `embeddings`
    ({"NAME:SPLIT": path}) their cached image embeddings; outside it, `refs` (any references file of
    `dico.metrics.inputs`) and the `images` folder. With several jobs, every caption and reference
    goes through one PTB tokenizer JVM first."""
    for job in jobs:
        job["texts"] = load_candidates(job["captions"])
    train_caps = [c for r in load_split(splits_json, "train") for c in r.captions] if splits_json else []
    if len(jobs) > 1 and splits_json:
        ptb_prefetch([c for job in jobs for c in job["texts"].values()] +
                     [c for split in dict.fromkeys(j["split"] for j in jobs)
                      for r in load_split(splits_json, split) for c in r.captions])
    with Outputs() as out:  # every metrics file, or none
        for job in jobs:
            out.write_json(job["out"], _evaluate_job(job, spec, evaluators, splits_json, refs, images, subset,
                                                     embeddings or {}, skip_broken, train_caps, grammar, device, log))


def _evaluate_job(job, spec, evaluators, splits_json, refs, images, subset, embeddings, skip_broken, train_caps,
                  grammar, device, log) -> dict:
    """The metrics JSON of one job of `evaluate_jobs`."""
    t0 = time.time()
    records = (load_split(splits_json, job["split"]) if splits_json else
               _reference_records(refs, job["split"], job, images, subset))
    image_embs = {name: _image_embeddings(ev, name, job["split"], records, embeddings, skip_broken, device, log)
                  for name, ev in evaluators.items()}
    result = score_split(job["texts"], records, spec, evaluators, image_embs, train_caps, grammar)
    run_prov = run_provenance(job["model_checkpoint"]) if job.get("model_checkpoint") else None
    log(f"{job['run']}/{job['split']}: " + ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a"
                                                      for k, v in result["metrics"].items()))
    return {"run": job["run"], "split": job["split"], "captions": str(job["captions"]), "n_images": len(records),
            **result, "provenance": provenance(spec, seed=run_prov["seed"] if run_prov else None, device=device,
                                               wall_time_s=time.time() - t0, run_provenance=run_prov,
                                               gpu_slots=gpu_slots_held())}  # null outside `dico gpu-run`


def _image_embeddings(evaluator, name: str, split: str, records, embeddings: dict, skip_broken: bool, device: str,
                      log):
    """The cached embeddings `embeddings["NAME:SPLIT"]` of the split's images, else computed here."""
    key = f"{name}:{split}"
    if key in embeddings:
        return load_embeddings(embeddings[key], records).to(device)
    return embed_images(evaluator, [r.path for r in records], device=device, split=split, skip_broken=skip_broken,
                        broken_hint="replace the file, or pass --skip-broken-images to leave such images out of "
                                    "every metric", log=log).to(device)


def _reference_records(refs_path, split: str, job: dict, images, subset: bool) -> list[ImageRecord]:
    """Outside the pipeline: the images of a references file (with `subset`, those that have a caption),
    their references, and their files under the `images` folder. The job's captions are re-keyed by the
    reference ids they match (a candidate may name its image by id or by file name)."""
    if not (refs_path and images):
        raise InputError("give --splits (inside the pipeline) or --refs FILE and --images DIR")
    refs = load_references(refs_path, split)
    texts = {}
    for key, caption in job["texts"].items():
        rid = _lookup(key, refs)
        if rid is not None and isinstance(rid, (int, str)):
            texts[rid] = caption
    job["texts"] = texts
    folder = ImageFolder(images)
    records = []
    for rid in (list(texts) if subset else list(refs.refs)):
        path, tried = folder.find([str(rid)], refs.files.get(rid, ()), _number(rid))
        if path is None:
            raise InputError(f"{refs_path}: image {rid!r} has no file under --images {Path(images)} (looked for "
                             f"{'; '.join(tried[:6])}); point --images at the folder that holds the images")
        records.append(ImageRecord(rid, path, tuple(refs.refs[rid])))
    return records

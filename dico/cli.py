"""`dico <step>`: every pipeline step runnable by hand; the Snakefile's rules call exactly these.

Each step reads the settings it needs either from `--spec-json` (what the Snakefile passes: the
resolved, validated slice of the config, see dico.config.*_spec) or from `--config FILE` (by hand;
validated against the same schema). Paths of inputs and outputs are explicit arguments.

    dico make-demo-data --out-dir results/data/demo
    dico train xe --splits results/data/splits.json --features-train ... --out-model ...
    dico evaluate --captions my_captions.json --refs dataset_coco.json --images coco/val2014 ...
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

from . import config as C

log = logging.getLogger("dico")


def _spec(args, make):
    if args.spec_json:
        return json.loads(args.spec_json)
    return make(C.load(args.config))


def _common(p: argparse.ArgumentParser):
    p.add_argument("--config", default="config/config.yaml", help="config YAML (ignored with --spec-json)")
    p.add_argument("--spec-json", help="resolved settings of this step (as the Snakefile passes them)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def _device(name: str) -> str:
    from .runtime import select_device

    return select_device(name)


# -- steps ---------------------------------------------------------------------------------------
def cmd_make_demo_data(args):
    from .demo import make_demo_data

    s = _spec(args, C.demo_spec)
    path = make_demo_data(args.out_dir, s["n_train"], s["n_val"], s["n_test"], s["image_size"], s["seed"],
                          refs_per_image=s["refs_per_image"])
    log.info("demo data written: %s", path)


def cmd_prepare_splits(args):
    """COCO's Karpathy file -> the split file; or, with --eval-set, one extra evaluation set's."""
    from .data import eval_set_spec, normalise_karpathy, prepare_eval_set

    if args.eval_set:
        s = _spec(args, lambda c: eval_set_spec(c, args.eval_set))
        n = prepare_eval_set(s, args.out, args.train_from, retries=args.retries, timeout=args.timeout,
                             workers=args.fetch_workers, log=log.info)
        log.info("evaluation set %s: %d images -> %s", args.eval_set, n, args.out)
        return
    if not (args.karpathy_json and args.image_root):
        raise SystemExit("give --karpathy-json and --image-root (COCO), or --eval-set NAME (evaluate.datasets)")
    counts = normalise_karpathy(args.karpathy_json, args.image_root, args.out, max_refs=args.max_refs)
    log.info("splits: %s -> %s", counts, args.out)


def cmd_train_clip(args):
    from .data import load_split
    from .demo import hard_negative_words, perturb_caption, pretraining_pairs, split_scenes
    from .demo_clip import tiny_clip_config, train_tiny_clip
    from .io import write_json
    from .runtime import configure

    s = _spec(args, lambda c: C.clip_model_spec(c, args.name))
    t = s["train"]
    configure(t["seed"], True, args.threads)
    cfg = tiny_clip_config(embed_dim=t["embed_dim"], image_size=s["image_size"], patch_size=t["patch_size"],
                           vision_width=t["vision_width"], vision_layers=t["vision_layers"],
                           text_width=t["text_width"], text_layers=t["text_layers"],
                           context_length=t["context_length"])
    init_state = None
    if t["init"]:  # read back through the loader of the real checkpoints, as every other consumer does
        if not args.init:
            raise SystemExit(f"clip_models.{s['name']}.train.init is {t['init']!r}: give its checkpoint with --init")
        init_state = _load_clip({"format": "openai"}, args.init).model.state_dict()
        log.info("starting from %s (clip_models.%s.train.init: %s)", args.init, s["name"], t["init"])
    extra = pretraining_pairs(t["pretraining_scenes"], s["image_size"], seed=t["seed"], workers=args.threads or 1)
    stats = train_tiny_clip(load_split(args.splits, "train"), cfg, args.out, steps=t["steps"],
                            batch_size=t["batch_size"], lr=t["lr"], seed=t["seed"],
                            hard_negative_fn=perturb_caption if t["hard_negatives"] else None, log=log.info,
                            eval_records=load_split(args.splits, "val"),
                            text_vocab=hard_negative_words() if t["hard_negatives"] else (),
                            extra_pairs=extra, init_state=init_state, temperature_lr_scale=t["temperature_lr_scale"],
                            scenes=split_scenes(args.splits, "train"), eval_scenes=split_scenes(args.splits, "val"))
    if args.stats:  # retrieval R@1 on val (and on up to 512 train images), the training figures
        write_json(args.stats, {"name": s["name"], "init": t["init"], **stats, "config": cfg})
    v = stats["val"]
    log.info("demo CLIP model %s written to %s: val R@1 i->t %.3f, t->i %.3f (hits: %s; by reference text "
             "%.3f, %.3f)", s["name"], args.out, v["i2t_r1"], v["t2i_r1"], v["hits"], v["i2t_r1_refs"], v["t2i_r1_refs"])


def _load_clip(spec: dict, path: str | None = None, device: str = "cpu"):
    from .evaluator import load_evaluator

    return load_evaluator(path or spec["path"], format=spec.get("format", "openai"), arch=spec.get("arch"),
                          device=device)


def cmd_cache_features(args):
    """One job (default), part --part of --parts (features.jobs > 1), or --gather of the parts' shards."""
    from .data import load_split
    from .features import cache_features, cache_features_part, gather_features, part_shards, shard_layout
    from .runtime import configure

    s = _spec(args, C.features_spec)
    records = load_split(args.splits, args.split)
    checkpoint = args.checkpoint or s["model"]["path"]
    sizes = dict(shard_size=s["shard_size"], dtype=s["dtype"], jpeg_draft=s["jpeg_draft"], amp=s["amp"])
    if args.gather:
        index = gather_features(s["backbone"], checkpoint, records, args.split, args.out_dir, args.gather, **sizes)
        log.info("features %s/%s: %d shards of %d parts checked, index written (%d images)", s["backbone"],
                 args.split, len(index["shards"]), args.gather, index["n_images"])
        return
    if (args.part is None) != (args.parts is None):
        raise SystemExit("give --part and --parts together (part K of N, K = 0 .. N-1)")
    configure(0, True, args.threads)
    device = _device(s["model"]["device"])
    owned = part_shards(len(shard_layout(len(records), s["shard_size"])), args.part, args.parts) if args.parts else None
    # a part without shards (more parts than shards) only writes its marker: no backbone to load
    evaluator = _load_clip(s["model"], args.checkpoint, device) if owned is None or len(owned) else None
    run = dict(shard_size=s["shard_size"], batch_size=s["batch_size"], dtype=s["dtype"], amp=s["amp"],
               num_workers=s["num_workers"], skip_broken=s["skip_broken_images"], jpeg_draft=s["jpeg_draft"],
               device=device, log=log.info)
    if owned is not None:
        info = cache_features_part(evaluator, s["backbone"], checkpoint, records, args.split, args.out_dir,
                                   args.part, args.parts, **run)
        log.info("features %s/%s part %d of %d: shards %s in %.1fs", s["backbone"], args.split, args.part,
                 args.parts, [x["file"] for x in info["shards"]] or "none", info["seconds"])
        return
    index = cache_features(evaluator, s["backbone"], checkpoint, records, args.split, args.out_dir, **run)
    log.info("features %s/%s: %d images, %dx%d %s in %.1fs", s["backbone"], args.split, index["n_images"],
             index["tokens"], index["dim"], index["dtype"], index["seconds"])


def cmd_cache_embeddings(args):
    from .data import load_split
    from .evaluate import embed_images, skipped_rows
    from .io import torch_save
    from .runtime import configure

    s = _spec(args, lambda c: C.clip_model_spec(c, args.name))
    configure(0, True, args.threads)
    device = _device(s["device"])
    evaluator = _load_clip(s, args.checkpoint, device)
    for job in _per_split(args, "out"):  # one model load for all the splits of the job
        records = load_split(args.splits, job["split"])
        t0 = time.time()
        embs = embed_images(evaluator, [r.path for r in records], device=device, split=job["split"],
                            skip_broken=args.skip_broken_images or s.get("skip_broken_images", False), log=log.info)
        torch_save({"model": s["name"], "split": job["split"], "image_ids": [r.image_id for r in records],
                    "skipped_images": [records[i].image_id for i in skipped_rows(embs)],
                    "embeddings": embs.half() if device.startswith("cuda") else embs}, job["out"])
        log.info("image embeddings %s/%s: %s in %.1fs", s["name"], job["split"], tuple(embs.shape), time.time() - t0)


def _parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"--{what} expects NAME=PATH, got {v!r}")
        out[name] = path
    return out


def _load_embeddings(path: str, records=None):
    import torch

    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image embeddings not found; run cache_embeddings first") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ValueError(f"{path} is not a readable embeddings file ({type(e).__name__}: {str(e)[:200]}); "
                         "delete it and rerun cache_embeddings") from None
    if not isinstance(blob, dict) or not {"image_ids", "embeddings"} <= set(blob):
        raise ValueError(f"{path}: not an image-embeddings file of `dico cache-embeddings`")
    if records is not None and blob["image_ids"] != [r.image_id for r in records]:
        raise ValueError(f"{path}: image embeddings do not match the split's images; rerun cache_embeddings")
    return blob["embeddings"].float()


def cmd_train(args):
    from .runtime import configure
    from .train import train_finetune, train_xe

    from .runtime import Dist

    spec = _spec(args, lambda c: C.run_spec(c, args.run))
    dist = Dist()
    configure(spec["seed"] + dist.rank, spec["deterministic"], args.threads)  # dropout differs per rank
    device = dist.setup(_device(spec["device"]))
    if not dist.main:
        logging.getLogger().setLevel(logging.WARNING)
    if dist.enabled:
        import torch.distributed

        group = torch.distributed.get_backend()
    else:
        group = "none"
    log.info("device %s, %d process(es), process group: %s", device, dist.world, group)
    features = {"train": args.features_train, "val": args.features_val}
    out = dict(work_dir=args.work_dir or str(Path(args.out_model).parent / "work"),
               out_model=args.out_model, out_log=args.out_log)
    if spec["method"] == "xe":
        return train_xe(spec, args.splits, features, device=device, log=log.info, dist=dist, **out)
    if not args.init:
        raise SystemExit(f"run {spec['run']} fine-tunes a model: pass --init <XE checkpoint>")
    ckpts = _parse_named(args.clip_model, "clip-model")
    embs = _parse_named(args.embeddings, "embeddings")
    evaluators, image_embs = {}, {}
    for name, mspec in spec["clip_models"].items():
        evaluators[name] = _load_clip(mspec, ckpts.get(name), device)
        image_embs[name] = {split: _load_embeddings(embs[f"{name}:{split}"]).to(device)
                            for split in ("train", "val") if f"{name}:{split}" in embs}
        if "val" not in image_embs[name]:
            raise SystemExit(f"--embeddings {name}:val=PATH is required (validation scores with {name})")
    train_finetune(spec, args.splits, features, args.init, evaluators=evaluators, image_embs=image_embs,
                   device=device, log=log.info, dist=dist, **out)


def _per_split(args, *names, runs: int = 1):
    """--split S [S ...] with one --<name> per split, in the same order; with several runs (one job
    for all runs, evaluate.group_runs), one per run and split, run-major: r1/S1, r1/S2, r2/S1, ..."""
    n = runs * len(args.split)
    for name in names:
        values = getattr(args, name)
        if len(values) != n:
            per = "per --split" if runs == 1 else f"per run and split ({runs} runs x {len(args.split)} splits)"
            raise SystemExit(f"give one --{name.replace('_', '-')} {per}: expected {n}, got {len(values)} "
                             f"--{name.replace('_', '-')}")
    rows = zip(args.split * runs, *(getattr(args, n) for n in names))
    return [{"index": i // len(args.split), **dict(zip(("split", *names), row))} for i, row in enumerate(rows)]


def cmd_generate(args):
    from .data import load_split
    from .io import write_json
    from .runtime import configure
    from .text import postprocess
    from .train import aligned_store, check_backbone, generate_captions, load_captioner

    s = _spec(args, C.generate_spec)
    configure(0, True, args.threads)
    device = _device(s["device"])
    dec = s["decoding"]
    features = {job["split"]: job["features"] for job in _per_split(args, "features")}
    stores, loaded = {}, None  # a split's features load once for all models (evaluate.group_runs)
    for job in _per_split(args, "out", runs=len(args.model)):
        path = args.model[job["index"]]
        if loaded != path:
            model, tok, payload = load_captioner(path, device)
            loaded = path
        records = load_split(args.splits, job["split"])
        if job["split"] not in stores:
            stores[job["split"]] = aligned_store(features[job["split"]], records, job["split"])
        store = stores[job["split"]]
        check_backbone(payload, store, path)
        t0 = time.time()
        caps = generate_captions(model, tok, store, range(len(records)), beam_size=dec["beam_size"],
                                 max_len=dec["max_len"], batch_size=dec["batch_size"], device=device,
                                 amp=s["amp"], style=dec["style"], length_penalty=dec["length_penalty"],
                                 progress=True)
        # decoding.postprocess: official = what the official save_predictions writes (dico.text)
        final = postprocess(caps, dec["postprocess"])
        write_json(job["out"], [{"image_id": r.image_id, "caption": c} for r, c in zip(records, final)])
        log.info("%s %s: %d captions in %.1fs -> %s (e.g. %r, decoded %r, postprocess %s)", path, job["split"],
                 len(caps), time.time() - t0, job["out"], final[0], caps[0], dec["postprocess"])


def cmd_evaluate(args):
    """Score captions of one or more splits of one or more runs (one process: the METEOR JVM starts
    once; it loads its paraphrase tables while this process imports and loads the CLIP models)."""
    from .data import load_split
    from .demo import grammar_of
    from .evaluate import load_captions
    from .metrics import ptb_prefetch, start_meteor
    from .runtime import configure

    s = _spec(args, C.evaluate_spec)
    if args.no_meteor:
        s["meteor"] = False
    if s["meteor"]:
        start_meteor()
    runs = args.run or ["external"]
    if args.model_checkpoint and len(args.model_checkpoint) != len(runs):
        raise SystemExit(f"give one --model-checkpoint per --run ({len(runs)} runs, "
                         f"{len(args.model_checkpoint)} --model-checkpoint)")
    configure(0, True, args.threads)
    device = _device(s["device"])
    ckpts = _parse_named(args.clip_model, "clip-model")
    evaluators = {name: _load_clip(m, ckpts.get(name), device) for name, m in s["clip_models"].items()}
    jobs = _per_split(args, "captions", "out", runs=len(runs))
    for job in jobs:
        job["run"] = runs[job["index"]]
        job["model_checkpoint"] = args.model_checkpoint[job["index"]] if args.model_checkpoint else None
        job["texts"] = load_captions(job["captions"])
    train_caps = ([c for r in load_split(args.splits, "train") for c in r.captions] if args.splits else [])
    grammar = grammar_of(args.splits)  # the demo's caption grammar on a demo set (diversity.fluent_pct)
    if len(jobs) > 1 and args.splits:  # every caption and reference through one PTB tokenizer JVM
        ptb_prefetch([c for job in jobs for c in job["texts"].values()] +
                     [c for split in args.split for r in load_split(args.splits, split) for c in r.captions])
    for job in jobs:
        _evaluate_split(args, s, job, evaluators, train_caps, grammar, device)


def _evaluate_split(args, s, job, evaluators, train_caps, grammar, device):
    from .data import ImageRecord, load_split
    from .evaluate import embed_images, load_references, score
    from .io import provenance, write_json

    t0, split, captions = time.time(), job["split"], job["texts"]
    if args.splits:
        records = load_split(args.splits, split)
    else:  # outside the DAG: any references file + an image folder
        if not (args.refs and args.images):
            raise SystemExit("give --splits (inside the pipeline) or --refs FILE and --images DIR")
        refs = load_references(args.refs, split)
        ids = [i for i in captions if i in refs] if args.subset else list(refs)
        records = [ImageRecord(i, _find_image(Path(args.images), i), tuple(refs[i])) for i in ids]
    embs = _parse_named(args.embeddings, "embeddings")
    image_embs = {}
    for name, evaluator in evaluators.items():
        key = f"{name}:{split}"
        image_embs[name] = (_load_embeddings(embs[key], records).to(device) if key in embs else
                            embed_images(evaluator, [r.path for r in records], device=device,
                                         split=split, skip_broken=args.skip_broken_images,
                                         log=log.info).to(device))
    result = score(captions, records, s, evaluators, image_embs, train_caps, grammar)
    run_prov = _run_provenance(job["model_checkpoint"])
    write_json(job["out"], {"run": job["run"], "split": split, "captions": str(job["captions"]),
                            "n_images": len(records), **result,
                            "provenance": provenance(s, seed=run_prov["seed"] if run_prov else None, device=device,
                                                     wall_time_s=time.time() - t0, run_provenance=run_prov)})
    log.info("%s/%s: %s", job["run"], split, ", ".join(f"{k} {v:.4f}" if v is not None else f"{k} n/a"
                                                      for k, v in result["metrics"].items()))


def _run_provenance(checkpoint: str | None) -> dict | None:
    """The training run's spec, seed and XE/best step, read from the captioner checkpoint."""
    if not checkpoint:
        return None
    import torch

    payload = torch.load(checkpoint, map_location="cpu", weights_only=False)
    spec = payload.get("spec", {})
    return {"checkpoint": checkpoint, "run": payload.get("run"), "seed": spec.get("seed"),
            "deterministic": spec.get("deterministic"),
            "best_step": payload.get("step"), "val": payload.get("val"), "spec": spec}


def _find_image(root: Path, image_id: int) -> Path:
    """COCO names images COCO_val2014_000000391895.jpg; accept that or <id>.jpg."""
    for pattern in (f"*{image_id:012d}.jpg", f"{image_id}.jpg", f"{image_id:06d}.jpg"):
        hits = sorted(root.rglob(pattern))
        if hits:
            return hits[0]
    raise FileNotFoundError(f"no image for image_id {image_id} under {root} "
                            f"(looked for *{image_id:012d}.jpg and {image_id}.jpg)")


# -- parser --------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dico", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-demo-data", help="generate the embedded demo data set")
    _common(p)
    p.add_argument("--out-dir", required=True)
    p.set_defaults(fn=cmd_make_demo_data)

    p = sub.add_parser("prepare-splits", help="Karpathy-format file -> normalised split file")
    _common(p)
    p.add_argument("--karpathy-json")
    p.add_argument("--image-root")
    p.add_argument("--max-refs", type=int, default=None)
    p.add_argument("--eval-set", metavar="NAME", help="build evaluation set NAME of evaluate.datasets instead "
                   "(settings from --spec-json or --config)")
    p.add_argument("--train-from", help="with --eval-set: the captioner's split file (its train split counts "
                   "novel captions)")
    p.add_argument("--retries", type=int, default=5, help="with --eval-set: attempts per image fetched by URL")
    p.add_argument("--timeout", type=float, default=60.0, help="with --eval-set: seconds per image request")
    p.add_argument("--fetch-workers", type=int, default=8, help="with --eval-set: parallel image downloads")
    p.add_argument("--out", required=True)
    p.set_defaults(fn=cmd_prepare_splits)

    p = sub.add_parser("train-clip", help="train a tiny demo CLIP model (backbone / reward / scorer)")
    _common(p)
    p.add_argument("--name", required=True, help="clip_models entry")
    p.add_argument("--splits", required=True)
    p.add_argument("--init", help="checkpoint of the entry that train.init names (the weights to start from)")
    p.add_argument("--out", required=True)
    p.add_argument("--stats", help="write the training figures and val retrieval R@1 here (JSON)")
    p.set_defaults(fn=cmd_train_clip)

    p = sub.add_parser("cache-features", help="grid features of the frozen backbone for one split")
    _common(p)
    p.add_argument("--splits", required=True)
    p.add_argument("--split", required=True)
    p.add_argument("--checkpoint", help="backbone weights (default: clip_models.<backbone>.path)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--part", type=int, help="cache only the shards of part K (0-based) of --parts (features.jobs)")
    p.add_argument("--parts", type=int, help="number of part jobs the split is scattered over")
    p.add_argument("--gather", type=int, metavar="N", help="check the shards of N part jobs and write index.json")
    p.set_defaults(fn=cmd_cache_features)

    p = sub.add_parser("cache-embeddings", help="image embeddings of a CLIP model for one or more splits")
    _common(p)
    p.add_argument("--name", required=True, help="clip_models entry")
    p.add_argument("--splits", required=True)
    p.add_argument("--split", nargs="+", required=True)
    p.add_argument("--checkpoint")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="NaN embedding for an unreadable image instead of failing (features.skip_broken_images)")
    p.add_argument("--out", nargs="+", required=True, help="embeddings file per split")
    p.set_defaults(fn=cmd_cache_embeddings)

    p = sub.add_parser("train", help="train one run: xe, scst_<reward>, dico, dico_<ablation>-<value>")
    _common(p)
    p.add_argument("run", help="run name (positional: torchrun would take --run for its --run-path)")
    p.add_argument("--splits", required=True)
    p.add_argument("--features-train", required=True)
    p.add_argument("--features-val", required=True)
    p.add_argument("--init", help="XE checkpoint to fine-tune (scst/dico)")
    p.add_argument("--clip-model", action="append", help="NAME=PATH of a clip_models checkpoint")
    p.add_argument("--embeddings", action="append", help="NAME:SPLIT=PATH of cached image embeddings")
    p.add_argument("--work-dir", help="resumable state (default: <out-model dir>/work)")
    p.add_argument("--out-model", required=True)
    p.add_argument("--out-log", required=True)
    p.set_defaults(fn=cmd_train)

    p = sub.add_parser("generate", help="beam-search captions of one or more splits (COCO result format)")
    _common(p)
    p.add_argument("--model", nargs="+", required=True, help="captioner checkpoint(s): one per run")
    p.add_argument("--splits", required=True)
    p.add_argument("--split", nargs="+", required=True)
    p.add_argument("--features", nargs="+", required=True, help="feature index per split")
    p.add_argument("--out", nargs="+", required=True,
                   help="captions JSON per model and split, model-major (m1/s1 m1/s2 m2/s1 ...)")
    p.set_defaults(fn=cmd_generate)

    p = sub.add_parser("evaluate", help="score COCO-format captions files (in or outside the pipeline)")
    _common(p)
    p.add_argument("--captions", nargs="+", required=True,
                   help='per split (per run and split, run-major, with several --run): [{"image_id": ..., "caption": ...}, ...]')
    p.add_argument("--split", nargs="+", default=["test"])
    p.add_argument("--splits", help="normalised split file (pipeline)")
    p.add_argument("--refs", help="references: Karpathy dataset_*.json, COCO captions_*.json or a split file")
    p.add_argument("--images", help="image folder (with --refs)")
    p.add_argument("--subset", action="store_true", help="score only the referenced images that have captions")
    p.add_argument("--clip-model", action="append", help="NAME=PATH overriding clip_models.<NAME>.path")
    p.add_argument("--embeddings", action="append", help="NAME:SPLIT=PATH of cached image embeddings")
    p.add_argument("--no-meteor", action="store_true")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="leave unreadable images out of every metric (listed in the JSON) instead of failing")
    p.add_argument("--run", nargs="+", help="run name(s) (default: external)")
    p.add_argument("--model-checkpoint", nargs="+", help="captioner checkpoint per run, for provenance")
    p.add_argument("--out", nargs="+", required=True, help="metrics JSON per split (per run and split, as --captions)")
    p.set_defaults(fn=cmd_evaluate)

    from . import report, score

    report.register(sub)
    score.register(sub)
    from . import download, official
    download.register(sub)
    official.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except C.ConfigError as e:
        log.error("%s", e)
        return 2
    except SystemExit as e:  # runtime.Preempted after SIGTERM: the checkpoint is saved; say so, keep 143
        if e.code == 143 and e.args:
            log.warning("%s", e.args[0])
        raise
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("DICO_TRACEBACK"):
            raise
        log.error("%s: %s", type(e).__name__, e)
        log.error("(set DICO_TRACEBACK=1 for the full traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

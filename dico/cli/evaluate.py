"""`dico evaluate`: every metric of the paper's tables for captions files, in or outside the pipeline."""
from __future__ import annotations

import logging

from .. import config as C
from .common import add_common, check_outputs, command, device, load_clip, parse_named, per_split, step_spec

log = logging.getLogger("dico")


def cmd_evaluate(args):
    """Score captions of one or more splits of one or more runs (one process: the METEOR JVM starts
    once; it loads its paraphrase tables while this process imports and loads the CLIP models)."""
    from ..demo import grammar_of
    from ..metrics.coco import start_meteor
    from ..metrics.run_metrics import evaluate_jobs
    from ..runtime import configure

    s = step_spec(args, C.evaluate_spec)
    check_outputs(args, "out")
    if args.no_meteor:
        s["meteor"] = False
    if s["meteor"]:
        start_meteor()
    runs = args.run or ["external"]
    if args.model_checkpoint and len(args.model_checkpoint) != len(runs):
        raise SystemExit(f"give one --model-checkpoint per --run ({len(runs)} runs, "
                         f"{len(args.model_checkpoint)} --model-checkpoint)")
    configure(0, True, args.threads)
    dev = device(s["device"])
    ckpts = parse_named(args.clip_model, "clip-model")
    evaluators = {name: load_clip(m, ckpts.get(name), dev) for name, m in s["clip_models"].items()}
    jobs = per_split(args, "captions", "out", runs=len(runs))
    for job in jobs:
        job["run"] = runs[job["index"]]
        job["model_checkpoint"] = args.model_checkpoint[job["index"]] if args.model_checkpoint else None
    # the demo's caption grammar on a demo set: diversity.fluent_pct
    evaluate_jobs(jobs, s, evaluators, splits_json=args.splits, refs=args.refs, images=args.images,
                  subset=args.subset, embeddings=parse_named(args.embeddings, "embeddings"),
                  skip_broken=args.skip_broken_images, grammar=grammar_of(args.splits), device=dev, log=log.info)


def register(sub) -> None:
    p = command(sub, "evaluate", "score COCO-format captions files (in or outside the pipeline)", cmd_evaluate,
                "Every metric of the paper's tables for captions of one or more splits of one or more runs, "
                "with diversity statistics and provenance: the pipeline's evaluate step (with --splits and "
                "cached embeddings), or anyone's captions (with --refs and --images).")
    add_common(p)
    p.add_argument("--captions", nargs="+", required=True,
                   help='per split (per run and split, run-major, with several --run): [{"image_id": ..., "caption": ...}, ...]')
    p.add_argument("--split", nargs="+", default=["test"], help="the split(s) the captions are of (default: test)")
    p.add_argument("--splits", help="normalised split file (pipeline)")
    p.add_argument("--refs", help="references: Karpathy dataset_*.json, COCO captions_*.json or a split file")
    p.add_argument("--images", help="image folder (with --refs)")
    p.add_argument("--subset", action="store_true", help="score only the referenced images that have captions")
    p.add_argument("--clip-model", action="append", help="NAME=PATH overriding clip_models.<NAME>.path")
    p.add_argument("--embeddings", action="append", help="NAME:SPLIT=PATH of cached image embeddings")
    p.add_argument("--no-meteor", action="store_true", help="skip METEOR (its JVM loads for ~15 s)")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="leave unreadable images out of every metric (listed in the JSON) instead of failing")
    p.add_argument("--run", nargs="+", help="run name(s) (default: external)")
    p.add_argument("--model-checkpoint", nargs="+", help="captioner checkpoint per run, for provenance")
    p.add_argument("--out", nargs="+", required=True, help="metrics JSON per split (per run and split, as --captions)")

"""`dico generate`: beam-search captions of one or more splits, for one or more checkpoints."""
from __future__ import annotations

import logging

from .. import config as C
from .common import add_common, check_outputs, command, device, per_split, step_spec

log = logging.getLogger("dico")


def cmd_generate(args):
    from ..inference import caption_splits
    from ..runtime import configure

    s = step_spec(args, C.generate_spec)
    check_outputs(args, "out")
    configure(0, True, args.threads)
    features = {job["split"]: job["features"] for job in per_split(args, "features")}
    jobs = [{"model": args.model[job["index"]], "split": job["split"], "features": features[job["split"]],
             "out": job["out"]} for job in per_split(args, "out", runs=len(args.model))]
    caption_splits(jobs, args.splits, s["decoding"], s["amp"], device(s["device"]), log=log.info)


def register(sub) -> None:
    p = command(sub, "generate", "beam-search captions of one or more splits (COCO result format)", cmd_generate,
                "Caption every image of one or more splits with one or more captioner checkpoints (beam search "
                "on the cached features, the official post-processing) and write COCO results lists.")
    add_common(p)
    p.add_argument("--model", nargs="+", required=True, help="captioner checkpoint(s): one per run")
    p.add_argument("--splits", required=True, help="the normalised split file")
    p.add_argument("--split", nargs="+", required=True, help="the splits to caption, one --features each")
    p.add_argument("--features", nargs="+", required=True, help="feature index per split")
    p.add_argument("--out", nargs="+", required=True,
                   help="captions JSON per model and split, model-major (m1/s1 m1/s2 m2/s1 ...)")

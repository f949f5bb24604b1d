"""`dico train-clip`, `dico cache-features`, `dico cache-embeddings`: the CLIP models' stage."""
from __future__ import annotations

import logging

from .. import config as C
from .common import add_common, check_outputs, command, device, load_clip, step_spec

log = logging.getLogger("dico")


def cmd_train_clip(args):
    from ..demo.clip import train_standin
    from ..runtime import configure

    s = step_spec(args, lambda c: C.clip_model_spec(c, args.name))
    check_outputs(args, "out", "stats")
    configure(s["train"]["seed"], True, args.threads)
    train_standin(s, args.splits, args.out, init=args.init, stats_out=args.stats, workers=args.threads or 1,
                  log=log.info)


def cmd_cache_features(args):
    """One job (default), part --part of --parts (features.jobs > 1), or --gather of the parts' shards."""
    from ..data import load_split
    from ..features import cache_features, cache_features_part, gather_features, part_shards, shard_layout
    from ..runtime import configure

    s = step_spec(args, C.features_spec)
    check_outputs(args, folders=("out_dir",))
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
    dev = device(s["model"]["device"])
    owned = part_shards(len(shard_layout(len(records), s["shard_size"])), args.part, args.parts) if args.parts else None
    # a part without shards (more parts than shards) only writes its marker: no backbone to load
    evaluator = load_clip(s["model"], args.checkpoint, dev) if owned is None or len(owned) else None
    run = dict(shard_size=s["shard_size"], batch_size=s["batch_size"], dtype=s["dtype"], amp=s["amp"],
               num_workers=s["num_workers"], skip_broken=s["skip_broken_images"], jpeg_draft=s["jpeg_draft"],
               device=dev, log=log.info)
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
    from ..data import load_split
    from ..embeddings import cache_embeddings
    from ..runtime import configure
    from .common import per_split

    s = step_spec(args, lambda c: C.clip_model_spec(c, args.name))
    check_outputs(args, "out")
    jobs = [(job["split"], load_split(args.splits, job["split"]), job["out"]) for job in per_split(args, "out")]
    configure(0, True, args.threads)
    dev = device(s["device"])
    evaluator = load_clip(s, args.checkpoint, dev)  # one model load for all the splits of the job
    cache_embeddings(evaluator, s["name"], jobs, device=dev, log=log.info,
                     skip_broken=args.skip_broken_images or s.get("skip_broken_images", False))


def register(sub) -> None:
    p = command(sub, "train-clip", "train a tiny demo CLIP model (backbone / reward / scorer)", cmd_train_clip,
                "Train one of the demo's CLIP stand-ins (a clip_models entry with source demo) on the demo data "
                "and save it in the PAC-S checkpoint layout, with its retrieval figures.")
    add_common(p)
    p.add_argument("--name", required=True, help="clip_models entry")
    p.add_argument("--splits", required=True, help="the normalised split file (train and val are read)")
    p.add_argument("--init", help="checkpoint of the entry that train.init names (the weights to start from)")
    p.add_argument("--out", required=True, help="the checkpoint to write (results/clip_models/<name>.pt)")
    p.add_argument("--stats", help="write the training figures and val retrieval R@1 here (JSON)")

    p = command(sub, "cache-features", "grid features of the frozen backbone for one split", cmd_cache_features,
                "Compute the frozen backbone's grid features of every image of a split once and store them as "
                "fp16 shards (resumable), or one part of them (--part/--parts), or check the parts (--gather).")
    add_common(p)
    p.add_argument("--splits", required=True, help="the normalised split file")
    p.add_argument("--split", required=True, help="the split to cache (train, val, test, or an evaluation set's name)")
    p.add_argument("--checkpoint", help="backbone weights (default: clip_models.<backbone>.path)")
    p.add_argument("--out-dir", required=True, help="folder of the shards and index.json")
    p.add_argument("--part", type=int, help="cache only the shards of part K (0-based) of --parts (features.jobs)")
    p.add_argument("--parts", type=int, help="number of part jobs the split is scattered over")
    p.add_argument("--gather", type=int, metavar="N", help="check the shards of N part jobs and write index.json")

    p = command(sub, "cache-embeddings", "image embeddings of a CLIP model for one or more splits",
                cmd_cache_embeddings, "Embed every image of one or more splits with a clip_models entry (a "
                "scorer or reward model) once, for training rewards, validation and evaluation.")
    add_common(p)
    p.add_argument("--name", required=True, help="clip_models entry")
    p.add_argument("--splits", required=True, help="the normalised split file")
    p.add_argument("--split", nargs="+", required=True, help="the splits to embed, one --out each")
    p.add_argument("--checkpoint", help="the model's weights (default: clip_models.<name>.path)")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="NaN embedding for an unreadable image instead of failing (features.skip_broken_images)")
    p.add_argument("--out", nargs="+", required=True, help="embeddings file per split")

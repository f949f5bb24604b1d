"""`dico make-demo-data` and `dico prepare-splits`: the data stage."""
from __future__ import annotations

import logging

from .. import config as C
from .common import add_common, check_outputs, command, step_spec

log = logging.getLogger("dico")


def cmd_make_demo_data(args):
    from ..demo import make_demo_data

    s = step_spec(args, C.demo_spec)
    check_outputs(args, folders=("out_dir",))
    path = make_demo_data(args.out_dir, s["n_train"], s["n_val"], s["n_test"], s["image_size"], s["seed"],
                          refs_per_image=s["refs_per_image"])
    log.info("demo data written: %s", path)


def cmd_prepare_splits(args):
    """COCO's Karpathy file -> the split file; with --eval-set, one extra evaluation set's; with neither,
    your own data set's (data.source folder of --config / --spec-json)."""
    from ..data import normalise_karpathy

    check_outputs(args, "out")
    if args.eval_set:
        return _prepare_eval_set(args)
    if not (args.karpathy_json or args.image_root):
        from ..own_data import prepare_folder

        prepare_folder(step_spec(args, C.folder_spec), args.out, log=log.info)
        return
    if not (args.karpathy_json and args.image_root):
        raise SystemExit("give --karpathy-json and --image-root (COCO), --eval-set NAME (evaluate.datasets), or "
                         "neither with a config of data.source folder (your own data set)")
    counts = normalise_karpathy(args.karpathy_json, args.image_root, args.out, max_refs=args.max_refs)
    log.info("splits: %s -> %s", counts, args.out)


def _prepare_eval_set(args):
    from ..eval_sets import demo_set_folder, prepare_eval_set

    s = step_spec(args, lambda c: C.eval_set_spec(c, args.eval_set))
    generated = None
    if s["format"] == "demo":  # the demo generator draws the set first (its test split)
        from ..demo import make_demo_data

        d = s["demo"]
        generated = make_demo_data(demo_set_folder(args.out), 0, 0, d["n_images"], d["image_size"], d["seed"],
                                   refs_per_image=d["refs_per_image"], variant=d["variant"])
    n = prepare_eval_set(s, args.out, args.train_from, retries=args.retries, timeout=args.timeout,
                         workers=args.fetch_workers, generated=generated, log=log.info)
    log.info("evaluation set %s: %d images -> %s", args.eval_set, n, args.out)


def register(sub) -> None:
    p = command(sub, "make-demo-data", "generate the embedded demo data set", cmd_make_demo_data,
                "Generate the demo's images (JPEG) and captions in the Karpathy schema (data.demo of the config).")
    add_common(p)
    p.add_argument("--out-dir", required=True, help="folder to write images/ and dataset_demo.json into")

    p = command(sub, "prepare-splits", "Karpathy-format file or your own folder -> normalised split file",
                cmd_prepare_splits,
                "Write the normalised split file (train / val / test records) every later step reads, from a "
                "Karpathy-format file and its image folder; with --eval-set, an extra evaluation set's; with "
                "neither, your own data set's (data.folder of --config with data.source folder: a folder of "
                "images and a captions file, split by a hash of each image's name, docs/own_data.md).")
    add_common(p)
    p.add_argument("--karpathy-json", help="Karpathy-format file (dataset_coco.json, or the demo's dataset_demo.json)")
    p.add_argument("--image-root", help="folder the Karpathy file's filepath/filename are relative to")
    p.add_argument("--max-refs", type=int, default=None, help="keep at most this many references per image")
    p.add_argument("--eval-set", metavar="NAME", help="build evaluation set NAME of evaluate.datasets instead "
                   "(settings from --spec-json or --config)")
    p.add_argument("--train-from", help="with --eval-set: the captioner's split file (its train split counts "
                   "novel captions)")
    p.add_argument("--retries", type=int, default=5, help="with --eval-set: attempts per image fetched by URL")
    p.add_argument("--timeout", type=float, default=60.0, help="with --eval-set: seconds per image request")
    p.add_argument("--fetch-workers", type=int, default=8, help="with --eval-set: parallel image downloads")
    p.add_argument("--out", required=True, help="the split file to write (results/data/splits.json)")

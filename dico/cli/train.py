"""`dico train <run>`: XE, SCST or DiCO training of one run (torchrun-friendly: `torchrun -m dico train ...`)."""
from __future__ import annotations

import logging
from pathlib import Path

from .. import config as C
from .common import add_common, check_outputs, command, device, load_clip, parse_named, step_spec

log = logging.getLogger("dico")


def cmd_train(args):
    from ..demo import grammar_of
    from ..runtime import Dist, configure
    from ..train import train_finetune, train_xe

    spec = step_spec(args, lambda c: C.run_spec(c, args.run))
    check_outputs(args, "out_model", "out_log")
    dist = Dist()
    configure(spec["seed"] + dist.rank, spec["deterministic"], args.threads)  # dropout differs per rank
    dev = dist.setup(device(spec["device"]))
    if not dist.main:
        logging.getLogger().setLevel(logging.WARNING)
    log.info("device %s, %d process(es), process group: %s", dev, dist.world, dist.backend)
    features = {"train": args.features_train, "val": args.features_val}
    out = dict(work_dir=args.work_dir or str(Path(args.out_model).parent / "work"),
               out_model=args.out_model, out_log=args.out_log, grammar=grammar_of(args.splits))
    if spec["method"] == "xe":
        return train_xe(spec, args.splits, features, device=dev, log=log.info, dist=dist, **out)
    if not args.init:
        raise SystemExit(f"run {spec['run']} fine-tunes a model: pass --init <XE checkpoint>")
    evaluators, image_embs = _clip_models(spec, args, dev)
    train_finetune(spec, args.splits, features, args.init, evaluators=evaluators, image_embs=image_embs,
                   device=dev, log=log.info, dist=dist, **out)


def _clip_models(spec: dict, args, dev: str) -> tuple[dict, dict]:
    """The run's clip_models (reward and validation scorers) and their cached image embeddings
    ({name: {"train"?, "val"}}), from --clip-model NAME=PATH and --embeddings NAME:SPLIT=PATH."""
    from ..embeddings import load_embeddings

    ckpts = parse_named(args.clip_model, "clip-model")
    embs = parse_named(args.embeddings, "embeddings")
    evaluators, image_embs = {}, {}
    for name, mspec in spec["clip_models"].items():
        evaluators[name] = load_clip(mspec, ckpts.get(name), dev)
        image_embs[name] = {split: load_embeddings(embs[f"{name}:{split}"]).to(dev)
                            for split in ("train", "val") if f"{name}:{split}" in embs}
        if "val" not in image_embs[name]:
            raise SystemExit(f"--embeddings {name}:val=PATH is required (validation scores with {name})")
    return evaluators, image_embs


def register(sub) -> None:
    p = command(sub, "train", "train one run: xe, scst_<reward>, dico, dico_<ablation>-<value>", cmd_train,
                "Train one run of the config (XE, SCST with a reward, DiCO or an ablation point) on cached "
                "features, validate it every val_every steps and write the selected checkpoint and the "
                "training log; resumes from its work folder after a kill (torchrun -m dico train ...).")
    add_common(p)
    p.add_argument("run", help="run name (positional: torchrun would take --run for its --run-path)")
    p.add_argument("--splits", required=True, help="the normalised split file")
    p.add_argument("--features-train", required=True, help="index.json of the train split's features")
    p.add_argument("--features-val", required=True, help="index.json of the val split's features")
    p.add_argument("--init", help="XE checkpoint to fine-tune (scst/dico)")
    p.add_argument("--clip-model", action="append", help="NAME=PATH of a clip_models checkpoint")
    p.add_argument("--embeddings", action="append", help="NAME:SPLIT=PATH of cached image embeddings")
    p.add_argument("--work-dir", help="resumable state (default: <out-model dir>/work); the TensorBoard "
                   "curves go beside it, in tensorboard/")
    p.add_argument("--out-model", required=True, help="the selected checkpoint to write (results/runs/<run>/model.pt)")
    p.add_argument("--out-log", required=True, help="the training log to write (JSONL, one row per log or validation)")

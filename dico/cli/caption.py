"""`dico caption`: caption image files or folders with a trained captioner or the released DiCO."""
from __future__ import annotations

import argparse
import logging

from .. import config as C
from .common import command, device

log = logging.getLogger("dico")

DESCRIPTION = (
    "Caption image files, or every image in folders (at any depth), with a captioner checkpoint the pipeline "
    "wrote or the released DiCO: no split file, no feature cache. The checkpoint names its backbone; its grid "
    "features are computed as cache_features computes them (clip_models and features of --config), then beam "
    "search and post-processing as dico generate runs them, with the decoding settings of the checkpoint's run. "
    "Writes what dico score reads as --captions and prints the first captions.")


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def cmd_caption(args):
    from .. import captioning as K
    from ..io import check_output
    from ..runtime import configure

    check_output(args.out, "--out")
    config = C.load(args.config)
    files = K.find_images(args.paths)
    names = K.image_names(files, args.format)
    configure(0, True, args.threads)
    dev = device(args.device)
    label = f"--official {args.official}" if args.official else f"--model {args.model}"
    model, tok, payload = K.load_model(args.model, args.official, backbone=config["features"]["backbone"],
                                       sha256=args.sha256, trust_pickle=args.trust_pickle, device=dev)
    spec = K.backbone_spec(payload, config, label, args.config, args.backbone_checkpoint)
    decoding, amp = K.decoding_settings(payload, config, args.beam, args.max_len, args.batch)
    log.info("%d images; %s reads %s (%s); beam %d, max_len %d, %s, post-processing %s, batches of %d, on %s",
             len(files), label, spec["name"], spec["path"], decoding["beam_size"], decoding["max_len"],
             decoding["style"], decoding["postprocess"], decoding["batch_size"], dev)
    captions, broken = K.caption_files(model, tok, payload, K.load_backbone(spec, dev), files,
                                       features=config["features"], decoding=decoding, amp=amp, device=dev,
                                       skip_broken=args.skip_broken_images, label=label)
    if broken:
        log.warning("left out %d images that could not be read (--skip-broken-images): %s", len(broken),
                    "; ".join(broken[:5]))
    n = K.write_captions(args.out, names, captions, args.format)
    print(K.caption_table(names, captions))
    log.info("%d captions -> %s (--format %s)", n, args.out, args.format)


def register(sub) -> None:
    p = command(sub, "caption", "caption image files or folders (any captioner checkpoint, or the released DiCO)",
                cmd_caption, DESCRIPTION)
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched at any depth for "
                   ".jpg .jpeg .png .bmp .gif .webp .tif .tiff files")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", metavar="CKPT", help="captioner checkpoint the pipeline writes "
                       "(results/runs/<run>/model.pt)")
    which.add_argument("--official", metavar="RELEASE", help="the released DiCO (aimagelab/DiCO): its zip, HF folder "
                       "or weights file, converted in memory as dico convert-official does; it reads the features "
                       "of features.backbone of --config and decodes with its decoding settings")
    p.add_argument("--out", default="captions.json", help="captions file to write (default: captions.json)")
    p.add_argument("--format", choices=["coco", "pacscore"], default="coco",
                   help='coco: a COCO results list [{"image_id": "<file name>", "caption": ...}]; pacscore: '
                        '{"<file name without extension>": caption}. Both are dico score --captions input')
    p.add_argument("--beam", type=_positive, help="beams (default: decoding.beam_size of the checkpoint's run)")
    p.add_argument("--max-len", type=_positive, help="maximum caption length in tokens, counting BOS "
                   "(default: decoding.max_len of the checkpoint's run)")
    p.add_argument("--batch", type=_positive, help="images per batch, through the backbone and the beam search "
                   "(default: decoding.batch_size of the checkpoint's run)")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu, cuda or cuda:N")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="leave an image that cannot be read out of the captions (listed in the log) instead of "
                        "stopping")
    p.add_argument("--config", default="config/config.yaml", help="config of the checkpoint's run: where its "
                   "backbone's weights are (clip_models) and the feature settings (features); default "
                   "config/config.yaml (the demo), config/paper.yaml for the paper's checkpoints")
    p.add_argument("--backbone-checkpoint", metavar="PATH", help="the backbone's weights (default: the path of "
                   "its clip_models entry in --config)")
    p.add_argument("--sha256", help="with --official: the release's sha256, checked first (official.sha256); a "
                   "pinned file may pickle more than tensors")
    p.add_argument("--trust-pickle", action="store_true", help="with --official: read weights that pickle Python "
                   "objects besides tensors (official.trust_pickle; can run code from the file)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")

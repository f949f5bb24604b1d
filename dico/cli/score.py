"""`dico score`: the paper's metrics for anyone's captions (a pacscore / pycocoevalcap drop-in; no config),
and with --correlation their Kendall tau against human judgements."""
from __future__ import annotations

import logging

from ..io import InputError
from ..metrics.keys import METRICS
from .common import check_outputs, command

log = logging.getLogger("dico")
SCORE_HELP = "`dico score`: the paper's metrics for anyone's captions, with no config file."


def register(sub) -> None:
    p = command(sub, "score", "score anyone's captions (pacscore / pycocoevalcap drop-in; no config)", cmd_score,
                SCORE_HELP)
    p.add_argument("--captions", help="candidates: COCO results list or pacscore's {name: caption}")
    p.add_argument("--refs", help="references: pacscore {name: [captions]}, COCO captions_*.json, Karpathy "
                                  "dataset_*.json or a dico split file")
    p.add_argument("--split", help="split of a Karpathy or dico split file (Karpathy: all images when omitted; "
                                   "split file: test)")
    p.add_argument("--images", help="folder of the images (needed by CLIP-S and PAC-S)")
    p.add_argument("--metrics", help=f"comma-separated subset of {','.join(METRICS)} (default: all that can run)")
    p.add_argument("--clip", help="CLIP-S model: OpenAI ViT-B-32.pt (or any OpenAI-layout checkpoint), or "
                                  "open_clip ARCH:PRETRAINED with cached weights")
    p.add_argument("--clip-arch", help="open_clip architecture of a --clip file in open_clip layout")
    p.add_argument("--pac", help="PAC-S model: the PAC-S checkpoint clip_ViT-B-32.pth")
    p.add_argument("--pac-arch", help="open_clip architecture of a --pac file in open_clip layout "
                                      "(ViT-L-14 for PAC-S's openClip_ViT-L-14.pth)")
    p.add_argument("--spice-jar-dir", help="folder with the Stanford CoreNLP 3.6.0 jars SPICE needs (`snakemake "
                   "download_spice --cores 1 --configfile config/paper.yaml` fetches them into resources/spice)")
    p.add_argument("--correlation", metavar="FILE",
                   help="human judgements in pacscore's flickr8k.json layout: print Kendall tau-b/tau-c per metric")
    p.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    p.add_argument("--batch-size", type=int, default=64, help="images per CLIP forward pass")
    p.add_argument("--workers", type=int, default=None,
                   help="image-decoding worker processes (default: half the CPU cores, at most 8; 0 = none)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--skip-broken-images", action="store_true",
                   help="leave an image that cannot be read out of every metric (counted and listed in --out) "
                        "instead of stopping")
    p.add_argument("--out", help="metrics JSON (a 'metrics' object with the pipeline's keys, and provenance)")
    p.add_argument("--per-caption", help="CSV with one row per image (per judgement with --correlation)")


def _workers(n: int | None) -> int:
    import os

    return min(8, (os.cpu_count() or 2) // 2) if n is None else max(0, n)


def cmd_score(args) -> None:
    import torch

    from ..metrics.correlation import correlation_files, format_correlation
    from ..metrics.score_files import format_table, score_files, write_outputs
    from ..runtime import select_device

    check_outputs(args, "out", "per_caption")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = select_device(args.device)
    common = dict(images=args.images, metrics=args.metrics, clip=args.clip, pac=args.pac, clip_arch=args.clip_arch,
                  pac_arch=args.pac_arch, spice_jar_dir=args.spice_jar_dir, device=device,
                  batch_size=args.batch_size, workers=_workers(args.workers))
    if args.correlation:
        if args.captions or args.refs:
            raise InputError("--correlation reads candidates, references and ratings from its own file; "
                             "drop --captions/--refs")
        result = correlation_files(args.correlation, skip_broken=args.skip_broken_images, **common)
        print(format_correlation(result))
    else:
        if not (args.captions and args.refs):
            raise InputError("give --captions FILE and --refs FILE (or --correlation FILE)")
        result = score_files(args.captions, args.refs, split=args.split, skip_broken=args.skip_broken_images,
                             log=log.warning, **common)
        print(format_table(result["metrics"], result["reasons"]))
    write_outputs(result, args.out, args.per_caption)


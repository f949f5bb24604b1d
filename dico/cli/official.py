"""`dico convert-official` and `dico export-official`: the released DiCO checkpoint, both ways."""
from __future__ import annotations

import argparse


def cmd_convert(args):
    from ..official import convert

    convert(args.src, args.out, backbone=args.backbone, sha256=args.sha256, trust_pickle=args.trust_pickle)


def cmd_export(args):
    from ..official import export

    export(args.checkpoint, args.out, zip=args.zip, backbone_checkpoint=args.backbone_checkpoint, weights=args.weights)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("convert-official", help="released DiCO checkpoint (HF layout) -> our captioner checkpoint")
    p.add_argument("--src", required=True, help="the release: HF folder, its zip/tar, or pytorch_model.bin / "
                   "model.safetensors (config.json beside it)")
    p.add_argument("--out", required=True, help="captioner checkpoint to write, e.g. results/runs/dico_official/model.pt")
    p.add_argument("--backbone", default="clip_l14", help="features.backbone entry whose features the model reads")
    p.add_argument("--sha256", help="official.sha256: the sha256 of --src (or of the weights file in a --src "
                   "folder), checked first; a pinned file may pickle more than tensors")
    p.add_argument("--trust-pickle", action="store_true", help="official.trust_pickle: unpickle weights that hold "
                   "Python objects besides tensors (can run code from the file)")
    p.set_defaults(fn=cmd_convert)
    e = subparsers.add_parser("export-official", help="our captioner checkpoint -> the released DiCO checkpoint's "
                              "layout (HF save_pretrained folder of the official VisionEncoderDecoderModel)")
    e.add_argument("--checkpoint", required=True, help="our captioner checkpoint (model.vocab: full), e.g. "
                   "results/runs/dico/model.pt")
    e.add_argument("--out", required=True, help="the folder to write (or the zip, with --zip)")
    e.add_argument("--zip", action="store_true", help="write a zip holding the folder")
    e.add_argument("--backbone-checkpoint", help="OpenAI-format CLIP ViT weights (e.g. ViT-L-14.pt): include the "
                   "frozen vision tower as encoder.vision_encoder.*")
    e.add_argument("--weights", default="pytorch_model.bin", choices=["pytorch_model.bin", "model.safetensors"],
                   help="weights file (transformers 4.20, which the official code pins, writes pytorch_model.bin)")
    e.set_defaults(fn=cmd_export)
    return p

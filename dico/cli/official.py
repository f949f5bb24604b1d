"""`dico convert-official` and `dico export-official`: the released DiCO checkpoint, both ways."""
from __future__ import annotations

import argparse

from .common import check_outputs, command


def cmd_convert(args):
    from ..official import convert

    check_outputs(args, "out")
    convert(args.src, args.out, backbone=args.backbone, sha256=args.sha256, trust_pickle=args.trust_pickle)


def cmd_export(args):
    from ..official import export

    check_outputs(args, *(["out"] if args.zip else []), folders=() if args.zip else ("out",))
    export(args.checkpoint, args.out, zip=args.zip, backbone_checkpoint=args.backbone_checkpoint, weights=args.weights)


def register(subparsers) -> argparse.ArgumentParser:
    p = command(subparsers, "convert-official", "released DiCO checkpoint (HF layout) -> our captioner checkpoint",
                cmd_convert, "Map the released DiCO checkpoint (aimagelab/DiCO: an HF save_pretrained folder, its "
                "zip or tar, or its weights file) onto our captioner and write it as one of our checkpoints.")
    p.add_argument("--src", required=True, help="the release: HF folder, its zip/tar, or pytorch_model.bin / "
                   "model.safetensors (config.json beside it)")
    p.add_argument("--out", required=True, help="captioner checkpoint to write, e.g. results/runs/dico_official/model.pt")
    p.add_argument("--backbone", default="clip_l14", help="features.backbone entry whose features the model reads")
    p.add_argument("--sha256", help="official.sha256: the sha256 of --src (or of the weights file in a --src "
                   "folder), checked first; a pinned file may pickle more than tensors")
    p.add_argument("--trust-pickle", action="store_true", help="official.trust_pickle: unpickle weights that hold "
                   "Python objects besides tensors (can run code from the file)")
    e = command(subparsers, "export-official", "our captioner checkpoint -> the released DiCO checkpoint's layout",
                cmd_export, "Write one of our captioner checkpoints in the release's layout (the HF save_pretrained "
                "folder of the official VisionEncoderDecoderModel), which the transformers classes load.")
    e.add_argument("--checkpoint", required=True, help="our captioner checkpoint (model.vocab: full), e.g. "
                   "results/runs/dico/model.pt")
    e.add_argument("--out", required=True, help="the folder to write (or the zip, with --zip)")
    e.add_argument("--zip", action="store_true", help="write a zip holding the folder")
    e.add_argument("--backbone-checkpoint", help="OpenAI-format CLIP ViT weights (e.g. ViT-L-14.pt): include the "
                   "frozen vision tower as encoder.vision_encoder.*")
    e.add_argument("--weights", default="pytorch_model.bin", choices=["pytorch_model.bin", "model.safetensors"],
                   help="weights file (transformers 4.20, which the official code pins, writes pytorch_model.bin)")
    return p

"""One of our captioner checkpoints in the release's layout (`dico export-official`).

What transformers 4.20's save_pretrained writes for the official VisionEncoderDecoderModel:
config.json + pytorch_model.bin, 4.20's persistent buffers included; the tables the official forward
never reads (BERT's word embeddings, token type 1 and pooler) as zeros; optionally the frozen CLIP
vision tower in HF CLIPVisionTransformer naming. `convert(export(x)) == x` exactly.
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import torch

from ..checkpoint import load_captioner
from ..clip_weights import load_evaluator
from ..io import atomic_path
from ..tokenizer import CLIP_VOCAB
from .mapping import VIT_L14, require, official_state_dict, release_config

log = logging.getLogger("dico")


def vision_tower(backbone_checkpoint: str | Path) -> tuple[dict, dict]:
    """(encoder.vision_encoder.* tensors in HF CLIPVisionTransformer naming, its CLIPVisionConfig
    fields) of an OpenAI-format CLIP ViT (as clip_models load it: TorchScript .pt, state dict or
    {'state_dict': ...}). OpenAI's fused in_proj is split into q|k|v; visual.proj (CLIP's projection
    head, not part of the tower) is dropped; heads = width / 64 and QuickGELU, as OpenAI CLIP."""
    v = load_evaluator(backbone_checkpoint, format="openai").model.visual
    if not hasattr(v, "conv1"):
        raise ValueError(f"{backbone_checkpoint}: --backbone-checkpoint must be a CLIP ViT (the official "
                         f"backbone is ViT-L/14), not {type(v).__name__}")
    w, patch = v.conv1.weight.shape[0], v.conv1.weight.shape[-1]
    grid = math.isqrt(v.positional_embedding.shape[0] - 1)
    blocks = v.transformer.resblocks
    sd = {"embeddings.class_embedding": v.class_embedding, "embeddings.patch_embedding.weight": v.conv1.weight,
          "embeddings.position_embedding.weight": v.positional_embedding,
          "embeddings.position_ids": torch.arange(grid * grid + 1)[None],
          "pre_layrnorm.weight": v.ln_pre.weight, "pre_layrnorm.bias": v.ln_pre.bias,
          "post_layernorm.weight": v.ln_post.weight, "post_layernorm.bias": v.ln_post.bias}
    for i, blk in enumerate(blocks):
        hf = f"encoder.layers.{i}"
        for part, wt, bs in zip("qkv", blk.attn.in_proj_weight.chunk(3), blk.attn.in_proj_bias.chunk(3)):
            sd[f"{hf}.self_attn.{part}_proj.weight"], sd[f"{hf}.self_attn.{part}_proj.bias"] = wt, bs
        for theirs, mod in [("self_attn.out_proj", blk.attn.out_proj), ("layer_norm1", blk.ln_1),
                            ("layer_norm2", blk.ln_2), ("mlp.fc1", blk.mlp.c_fc), ("mlp.fc2", blk.mlp.c_proj)]:
            sd[f"{hf}.{theirs}.weight"], sd[f"{hf}.{theirs}.bias"] = mod.weight, mod.bias
    config = {"hidden_size": w, "intermediate_size": blocks[0].mlp.c_fc.weight.shape[0],
              "num_hidden_layers": len(blocks), "num_attention_heads": w // 64, "image_size": grid * patch,
              "patch_size": patch}
    return {f"encoder.vision_encoder.{k}": t.detach().float().contiguous().clone() for k, t in sd.items()}, config


def _grid_config(dim: int, tokens: int) -> dict:
    """The vision config without a tower: ViT-L/14's for its 257 x 1024 grid, else one that only
    sizes the grid (width, patch 14, 1 + g*g tokens)."""
    if (dim, tokens) == (1024, 257):
        return dict(VIT_L14)
    grid = math.isqrt(tokens - 1)
    require(grid * grid + 1 == tokens, f"{tokens} visual tokens is not 1 + a square grid of patches")
    return {"hidden_size": dim, "intermediate_size": 4 * dim, "num_hidden_layers": 1,
            "num_attention_heads": max(1, dim // 64), "patch_size": 14, "image_size": 14 * grid}


def _write_folder(out: Path, files: dict) -> None:
    """Write {name: writer(path)} into a temporary folder next to `out`, then rename it to `out`."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        for name, write in files.items():
            write(tmp / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)


def export(checkpoint: str | Path, out: str | Path, *, zip: bool = False, backbone_checkpoint: str | Path | None = None,
           weights: str = "pytorch_model.bin") -> Path:
    """Write our captioner checkpoint in the release's layout at `out`: a folder (config.json +
    `weights`), or with zip=True a zip of it (entries `<out stem>/...`). With `backbone_checkpoint`
    the frozen vision tower is included as encoder.vision_encoder.*."""
    model, tok, payload = load_captioner(checkpoint)
    if payload["tokenizer"].get("clip_ids") is not None or model.cfg.vocab_size != CLIP_VOCAB:
        raise ValueError(f"{checkpoint}: its decoder predicts {model.cfg.vocab_size} ids (model.vocab: train), but "
                         f"the release's predicts all {CLIP_VOCAB} CLIP ids; only checkpoints trained with "
                         "model.vocab: full can be exported (set model.vocab: full and retrain)")
    sd = official_state_dict(model)
    grid = payload["backbone"]
    if backbone_checkpoint is not None:
        tower, vision = vision_tower(backbone_checkpoint)
        got = (vision["hidden_size"], (vision["image_size"] // vision["patch_size"]) ** 2 + 1)
        require(got == (grid["dim"], grid["tokens"]),
                 f"--backbone-checkpoint {backbone_checkpoint} gives {got[1]} x {got[0]} grid features, but "
                 f"{checkpoint} was trained on {grid['tokens']} x {grid['dim']} ({grid['name']})")
        sd.update(tower)
    else:
        vision = _grid_config(grid["dim"], grid["tokens"])
        log.warning("no --backbone-checkpoint: the export has no encoder.vision_encoder.* weights (the official "
                    "code needs them to run on pixels)")
    config = json.dumps(release_config(model.cfg, vision), indent=2) + "\n"
    if weights == "pytorch_model.bin":
        save = lambda path: torch.save(sd, path)  # noqa: E731  (lm_head and wte share one storage)
    elif weights == "model.safetensors":
        from safetensors.torch import save_file

        plain = {k: v for k, v in sd.items() if k != "decoder.lm_head.weight"}  # safetensors keeps no shared tensors
        save = lambda path: save_file(plain, str(path))  # noqa: E731
    else:
        raise ValueError(f"--weights must be pytorch_model.bin or model.safetensors, not {weights!r}")
    out = Path(out)
    files = {"config.json": lambda path: path.write_text(config), weights: save}
    if not zip:
        _write_folder(out, files)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".export-", dir=out.parent) as tmp, atomic_path(out) as part:
            folder = Path(tmp) / out.stem
            _write_folder(folder, files)
            with zipfile.ZipFile(part, "w") as zf:
                for name in files:
                    zf.write(folder / name, f"{out.stem}/{name}")
    log.info("%s -> %s: release layout (%s%s), d %d, %d+%d layers, vocab %d", checkpoint, out, weights,
             ", vision tower" if backbone_checkpoint else "", model.cfg.d_model, model.cfg.enc_layers,
             model.cfg.dec_layers, model.cfg.vocab_size)
    return out

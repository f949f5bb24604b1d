"""The released DiCO checkpoint as one of our captioner checkpoints (`dico convert-official`).

The config.json's generation settings that would change the official `generate()` (repetition
penalty, n-gram blocking, min length, ...) are reported and recorded in the checkpoint's spec.
"""
from __future__ import annotations

import logging
from pathlib import Path

from ..checkpoint import captioner_payload
from ..io import torch_save
from ..model import Captioner
from ..tokenizer import CLIP_VOCAB, CaptionTokenizer
from .mapping import require, captioner_config, convert_state_dict
from .release import generation_overrides, load_release

log = logging.getLogger("dico")

RUN = "dico_official"


def convert(src: str | Path, out: str | Path, backbone: str = "clip_l14", sha256: str | None = None,
            trust_pickle: bool = False) -> dict:
    """Write our captioner checkpoint (dico.checkpoint format, run `dico_official`) for the release at
    `src`; `backbone` is the features.backbone whose cached features it reads (CLIP ViT-L/14).
    `sha256` / `trust_pickle`: see load_release."""
    payload = official_payload(src, backbone, sha256=sha256, trust_pickle=trust_pickle)
    torch_save(payload, out)
    cfg = payload["model_config"]
    log.info("official DiCO -> %s: %.1fM parameters, d %d, %d+%d layers, %d heads, vocab %d, backbone %s %dx%d",
             out, sum(v.numel() for v in payload["state_dict"].values()) / 1e6, cfg["d_model"], cfg["enc_layers"],
             cfg["dec_layers"], cfg["n_heads"], cfg["vocab_size"], backbone, payload["backbone"]["tokens"],
             cfg["feat_dim"])
    return payload


def official_payload(src: str | Path, backbone: str = "clip_l14", sha256: str | None = None,
                     trust_pickle: bool = False) -> dict:
    """The checkpoint `convert` writes, in memory (`dico caption --official` captions with it as is)."""
    sd, hf = load_release(src, sha256=sha256, trust_pickle=trust_pickle)
    for key in ("decoder.transformer.wte.weight", "encoder.vis_enc_to_enc_proj.weight"):
        require(key in sd, f"no {key} (is this a DiCO VisionEncoderDecoderModel checkpoint?)")
    cfg, tokens = captioner_config(sd, hf)
    require(tokens <= cfg.max_enc_positions, f"{tokens} visual tokens but only {cfg.max_enc_positions} encoder positions")
    require(cfg.vocab_size == CLIP_VOCAB, f"vocabulary of {cfg.vocab_size} tokens, expected CLIP's {CLIP_VOCAB} "
             "(49,408 BPE + <|pad|>)")
    model = Captioner(cfg)
    model.load_state_dict(convert_state_dict(sd, cfg), strict=True)
    overrides = generation_overrides(hf)
    if overrides:
        log.warning("the release's config.json sets generation options that the official generate() applies "
                    "and dico's beam search does not: %s", overrides)
    spec = {"run": RUN, "method": "official", "seed": None, "source": str(src), "hf_generation": overrides,
            "hf_config": {"encoder": (hf or {}).get("encoder", {}).get("encoder"), "decoder": (hf or {}).get("decoder")}}
    return captioner_payload(model.eval(), CaptionTokenizer(), {"name": backbone, "dim": cfg.feat_dim, "tokens": tokens},
                             spec, step=None, val=None)

"""The demo's tiny CLIP training step: the plain loop (AdamW over CLIP's whole 49,408-row token
table, the text tower over the full 32-token context) against dico.demo.clip's (a CompactTokenTable of
the ids the captions use, the text tower on caption prefixes, in one prefix for the batch or in
demo_clip.TEXT_BUCKETS length groups). All compute the same model (tests/test_evaluator.py); this
measures what the shortcuts save at the demo's shapes."""
from __future__ import annotations

import math
import random

import torch
import torch.nn.functional as F

from common import interleaved


def _demo_captions(n: int, seed: int = 0) -> list[str]:
    from dico import demo

    rng = random.Random(seed)
    return [demo.caption(demo.random_scene(rng), rng) for _ in range(n)]


def _step_fn(fast: bool, images, tokens, cfg, seed: int = 0, buckets: int = 1):
    from dico.demo.clip import build_tiny_clip, clip_optimizer, CompactTokenTable, contrastive_loss
    from dico.clip_model import encode_text_prefix

    model = build_tiny_clip(cfg, seed).train()
    table = CompactTokenTable(model.token_embedding, tokens.flatten()) if fast else None
    params = ([p for p in model.parameters() if p is not model.token_embedding.weight] + [table.weight]
              if fast else model.parameters())
    opt = clip_optimizer(params, 1e-3, 0.1)

    def step():
        img = F.normalize(model.encode_image(images), dim=-1)
        text = encode_text_prefix(model, tokens, table, buckets) if fast else model.encode_text(tokens)
        loss, _ = contrastive_loss(model, img, F.normalize(text, dim=-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
    return step


def bench_demo_clip_step(quick: bool) -> str:
    """One step at config/config.yaml's demo sizes: 128 images of 48 px (patch 16), 128 captions +
    128 hard negatives (the `pac` stand-in's batch), ViT and text tower width 64 x 2 layers, 32-token
    context."""
    from dico.demo.clip import TEXT_BUCKETS, tiny_clip_config
    from dico.clip_model import tokenize

    cfg = tiny_clip_config(embed_dim=64, image_size=48, patch_size=16, vision_width=64, vision_layers=2,
                           text_width=64, text_layers=2, context_length=32)
    torch.manual_seed(0)
    images = torch.randn(128, 3, 48, 48)
    tokens = tokenize(_demo_captions(256), 32)
    variants = {"plain": _step_fn(False, images, tokens, cfg), "prefix": _step_fn(True, images, tokens, cfg)}
    variants.update({f"{b} groups": _step_fn(True, images, tokens, cfg, buckets=b) for b in (2, TEXT_BUCKETS, 4, 6)})
    times = interleaved(variants, repeats=3 if quick else 7)
    used = int(tokens.argmax(-1).max()) + 1
    mean = float((tokens.argmax(-1) + 1).float().mean())
    ratios = ", ".join(f"{name} {times[name] * 1e3:.0f} ms {times['plain'] / times[name]:.1f}x"
                       for name in variants if name != "plain")
    return (f"demo_clip_step: tiny CLIP step (128 images + 256 texts, {len(torch.unique(tokens))} of 49,408 token "
            f"ids, captions fill {mean:.1f} (longest {used}) of 32 positions), plain {times['plain'] * 1e3:.0f} ms; "
            f"dico.demo.clip (TEXT_BUCKETS = {TEXT_BUCKETS}): {ratios}")

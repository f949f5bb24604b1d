"""The evaluator at the paper's CLIP ViT-B/32 shapes (the CLIP-S / PAC-S scorer and reward model; random
weights): its text embedding and its loading, each against the path it replaced, in this process.

- text_embed: `Evaluator.embed_tokens` (texts shortest first, each batch up to its longest EOT) against
  open_clip's `encode_text` over CLIP's whole 77-token context, on captions of COCO-like length.
- load_evaluator: `load_evaluator` (open_clip's builder on the meta device, the weights assigned)
  against the builder's random initialisation and fp16 load followed by an fp32 load, from an fp16
  OpenAI-named checkpoint like OpenAI's released ViT-B-32.pt.
Both give the same numbers (tests/test_evaluator.py); this measures what they save."""
from __future__ import annotations

import random
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from common import interleaved

# OpenAI CLIP ViT-B/32 (the shapes build_model_from_openai_state_dict infers from ViT-B-32.pt)
VIT_B32 = dict(embed_dim=512, image_size=224, patch_size=32, vision_width=768, vision_layers=12, text_width=512,
               text_layers=12, context_length=77)


def _b32(seed: int = 0):
    from dico.demo.clip import build_tiny_clip, tiny_clip_config

    return build_tiny_clip(tiny_clip_config(**VIT_B32), seed).eval()


def _captions(n: int, seed: int = 0) -> list[str]:
    from dico import demo

    rng = random.Random(seed)
    return [demo.caption(demo.random_scene(rng), rng) for _ in range(n)]


def bench_text_embed(quick: bool) -> str:
    from dico.clip_model import Evaluator, tokenize
    from dico.metrics.clipscore import PACS_PREFIX

    model = _b32()
    ev = Evaluator(model)
    tokens = tokenize([PACS_PREFIX + c for c in _captions(64 if quick else 256)], 77)

    @torch.no_grad()
    def full():
        return F.normalize(torch.cat([model.encode_text(t) for t in tokens.split(256)]), dim=-1)

    assert torch.allclose(full(), ev.embed_tokens(tokens), atol=1e-5)
    times = interleaved({"full": full, "prefix": lambda: ev.embed_tokens(tokens)}, repeats=3)
    fill = float((tokens.argmax(-1) + 1).float().mean())
    return (f"text_embed: {len(tokens)} captions ({fill:.1f} of 77 positions on average, with the PAC-S prefix) "
            f"through CLIP ViT-B/32's text tower: full context {times['full']:.2f} s, "
            f"Evaluator.embed_tokens {times['prefix']:.2f} s {times['full'] / times['prefix']:.1f}x")


def bench_load_evaluator(quick: bool) -> str:
    from open_clip.model import build_model_from_openai_state_dict

    from dico.clip_weights import load_evaluator

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "ViT-B-32-fp16.pt"
        sd = {k: v.half() for k, v in _b32().state_dict().items()}  # OpenAI's released weights are fp16
        torch.save(sd, path)

        def builder():  # the path load_evaluator took before: random init, fp16 load, fp32 reload
            state = torch.load(path, map_location="cpu", weights_only=True)
            model = build_model_from_openai_state_dict(dict(state), cast_dtype=None)
            return model.float().load_state_dict(state, strict=True)

        times = interleaved({"builder": builder, "meta": lambda: load_evaluator(path)}, repeats=3 if quick else 5)
    return (f"load_evaluator: CLIP ViT-B/32 from an fp16 OpenAI-named checkpoint, open_clip's builder "
            f"(random init) + fp32 load {times['builder']:.2f} s, load_evaluator {times['meta']:.2f} s "
            f"{times['builder'] / times['meta']:.1f}x")

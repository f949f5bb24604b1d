"""The CLIP model wrapper (`Evaluator`): one frozen CLIP used as feature backbone, reward model and metric.

Three uses (docs/fidelity.md rows 1, 12 and 26):
  1. its vision tower gives the captioner's frozen *grid features*: all 1+P tokens after the last
     transformer block, before ln_post and the projection (HF CLIPVisionModel.last_hidden_state);
  2. it is the reward model of fine-tuning: r = w·cos(E_I, E_T), no clamp, no prefix (`dico.rewards`);
  3. it computes CLIP-S / RefCLIP-S (w = 2.5) and PAC-S / RefPAC-S (w = 2.0) with the prefix
     "A photo depicts " (CLIPScore, Hessel et al. 2021; pacscore evaluation/pac_score/pac_score.py;
     `dico.metrics.clipscore`).

Its weights are loaded and saved by `dico.clip_weights`: OpenAI CLIP (ViT-B/32, ViT-L/14) or the PAC-S
checkpoints on a cluster, the demo's tiny stand-ins (`dico.demo.clip`) in the same PAC-S layout.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

# CLIP's preprocessing constants (OpenAI CLIP, PAC-S and HF CLIPFeatureExtractor all use them)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
HEAD_WIDTH = 64  # build_model_from_openai_state_dict infers heads = width // 64
PACS_PREFIX = "A photo depicts "


# preprocessing and tokenisation

def clip_preprocess(image, size: int, mean=CLIP_MEAN, std=CLIP_STD) -> torch.Tensor:
    """PIL image -> [3, size, size], exactly the CLIP / PAC-S test transform:
    bicubic resize of the shortest side to `size`, center crop, RGB, [0,1], (x - mean) / std."""
    import torchvision.transforms.functional as TF
    from torchvision.transforms import InterpolationMode

    image = TF.resize(image, size, interpolation=InterpolationMode.BICUBIC)
    image = TF.center_crop(image, size)
    x = TF.to_tensor(image.convert("RGB"))
    return TF.normalize(x, mean, std)


def tokenize(texts: Sequence[str], context_length: int) -> torch.Tensor:
    """CLIP BPE ids [N, context_length]: SOT text EOT, zero-padded; a long text is truncated and its
    last kept position overwritten with EOT (the pooling reads the EOT position = argmax id)."""
    import open_clip

    return open_clip.tokenize(list(texts), context_length=context_length)


def _with_prefix(texts: Sequence[str], prefix: str) -> list[str]:
    # pacscore appends a space to a prefix that lacks one ('A photo depicts' -> 'A photo depicts ')
    if prefix and not prefix.endswith(" "):
        prefix += " "
    return [prefix + t for t in texts]


# -----------------------------------------------------------------------------
# the evaluator

class Evaluator:
    """A frozen open_clip CLIP with the three views DiCO needs: grid features, embeddings, scores."""

    def __init__(self, model: torch.nn.Module, name: str = ""):
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.name = name
        visual = model.visual
        size = visual.image_size
        self.image_size = int(size[0] if isinstance(size, (tuple, list)) else size)
        self.context_length = int(model.context_length)
        self.embed_dim = int(getattr(visual, "output_dim", 0) or model.text_projection.shape[-1])
        is_vit = hasattr(visual, "conv1") and hasattr(visual, "transformer")
        self.grid_width = int(visual.transformer.width) if is_vit else None
        pcfg = open_clip.get_model_preprocess_cfg(model)
        self.mean = tuple(pcfg.get("mean", CLIP_MEAN))
        self.std = tuple(pcfg.get("std", CLIP_STD))

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device) -> "Evaluator":
        self.model.to(device)
        return self

    def preprocess(self, pil_image) -> torch.Tensor:
        return clip_preprocess(pil_image, self.image_size, self.mean, self.std)

    @torch.no_grad()
    def grid_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """[B,3,S,S] -> [B, 1+P, W]: the vision transformer's output tokens before ln_post/proj.
        Same steps as open_clip's VisionTransformer.forward (_embeds, then transformer), stopping
        before _pool: patchify conv -> prepend class token -> + positions -> ln_pre -> blocks."""
        v = self.model.visual
        if self.grid_width is None or getattr(v, "attn_pool", None) is not None:
            raise ValueError(f"grid_features needs a plain ViT vision tower; {type(v).__name__} "
                             "of this evaluator is not one")
        x = v.conv1(pixels.to(self.device, self.dtype))        # [B, W, g, g]
        x = x.flatten(2).transpose(1, 2)                         # [B, P, W], row-major patches
        cls = v.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + v.positional_embedding.to(x.dtype)
        x = v.patch_dropout(x)                                   # identity in eval mode
        x = v.ln_pre(x)
        return v.transformer(x)                                  # batch-first in, batch-first out

    @torch.no_grad()
    def embed_images(self, pixels: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """[N,3,S,S] -> [N,D] L2-normalised (fp32), computed batch by batch on the model's device."""
        out = [self.model.encode_image(pixels[i:i + batch_size].to(self.device, self.dtype))
               for i in range(0, len(pixels), batch_size)]
        return _l2(out, self.embed_dim, self.device)

    @torch.no_grad()
    def embed_tokens(self, tokens: torch.Tensor, batch_size: int = 256, precision: str = "none") -> torch.Tensor:
        """CLIP token ids [N, context_length] -> [N,D] L2-normalised (fp32). `precision="fp16"` runs the
        text tower under fp16 autocast on a GPU (the official training reward's precision).

        A causal text tower (`text_tower_is_causal`: OpenAI CLIP, PAC-S) runs the texts shortest first in
        groups of at most `batch_size`, each on the positions up to its longest text's EOT
        (`encode_text_prefix`'s length groups): the same
        embeddings as `encode_text` on the full context up to float rounding, for a fraction of the
        work, since a caption fills ~15-20 of CLIP's 77 positions."""
        half = precision == "fp16" and self.device.type == "cuda"
        with torch.autocast("cuda", dtype=torch.float16, enabled=half):
            if not len(tokens):
                out = []
            elif text_tower_is_causal(self.model):  # length groups of at most batch_size texts
                out = [encode_text_prefix(self.model, tokens.to(self.device), buckets=-(-len(tokens) // batch_size))]
            else:
                out = [self.model.encode_text(tokens[i:i + batch_size].to(self.device))
                       for i in range(0, len(tokens), batch_size)]
        return _l2(out, self.embed_dim, self.device)

    def embed_texts(self, texts: Sequence[str], prefix: str = "", batch_size: int = 256) -> torch.Tensor:
        """prefix + text for each text -> [N,D] L2-normalised (fp32)."""
        texts = _with_prefix(texts, prefix)
        out = [self.embed_tokens(tokenize(texts[i:i + batch_size], self.context_length), batch_size)
               for i in range(0, len(texts), batch_size)]
        return torch.cat(out) if out else torch.zeros(0, self.embed_dim, device=self.device)


def text_tower_is_causal(model) -> bool:
    """True when `model.encode_text` is an OpenAI-style text tower: causal self-attention (no position
    attends to a later one) pooled at the EOT token (the highest id). Then a text's embedding does not
    depend on the padding after its EOT, and `encode_text_prefix` may skip it."""
    return (getattr(model, "attn_mask", None) is not None and getattr(model, "text_pool_type", None) == "argmax"
            and all(hasattr(model, a) for a in ("token_embedding", "positional_embedding", "transformer", "ln_final")))


def encode_text_prefix(model, tokens: torch.Tensor, embed=None, buckets: int = 1) -> torch.Tensor:
    """`model.encode_text(tokens)` computed on the first L positions only, L = the last EOT + 1, for a
    model where `text_tower_is_causal` holds: the output at each text's EOT, where CLIP pools, does
    not depend on the padding after it, so the result equals the full pass up to float rounding
    (tests/test_evaluator.py checks it against open_clip's `encode_text`). `embed`: a token embedding
    to use instead of `model.token_embedding` (e.g. a table of just the rows a training run meets,
    trained in its place). `buckets` > 1:
    the texts sorted by length and cut into that many groups, each run on its own prefix (every text's
    output is a function of that text alone), so short texts do not pay for the longest one."""
    from open_clip.transformer import text_global_pool

    if buckets > 1 and len(tokens) >= buckets:  # shortest to longest, each bucket on its own prefix
        order = tokens.argmax(-1).argsort()
        out = torch.cat([encode_text_prefix(model, tokens[part], embed) for part in order.chunk(buckets)])
        return out[order.argsort()]
    length = int(tokens.argmax(-1).max()) + 1
    tokens = tokens[:, :length]
    cast_dtype = model.transformer.get_cast_dtype()  # as open_clip's CLIP.encode_text
    x = (model.token_embedding if embed is None else embed)(tokens).to(cast_dtype)
    x = x + model.positional_embedding[:length].to(cast_dtype)
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask[:length, :length]))
    x = text_global_pool(x, tokens, model.text_pool_type)
    proj = model.text_projection
    if proj is None:
        return x
    return proj(x) if isinstance(proj, torch.nn.Linear) else x @ proj


def _l2(chunks: list[torch.Tensor], dim: int, device) -> torch.Tensor:
    # normalise in fp32 even when the towers ran under fp16 autocast
    if not chunks:
        return torch.zeros(0, dim, device=device)
    return F.normalize(torch.cat(chunks).float(), dim=-1)


"""Rewards for fine-tuning: a CLIP-style evaluator score or CIDEr-D, one number per candidate.

CLIP rewards follow the training-time form of the official DiCO code by default: r = w * cos(image,
caption) with no text prefix and no clamp (dico.md section 1.3, step 2); prefix and clamp are config
options, so the metric form (prefix "A photo depicts ", clamp at 0) is one setting away. Image
embeddings of the training split are cached once (`cache_embeddings`), so a step only encodes text.

The CIDEr-D reward uses document frequencies of the *training* references, computed once, as SCST
implementations do (peers.md section 1.1), with a light Python tokenizer instead of the Java PTB one.
"""
from __future__ import annotations

import torch

from .cider import CiderD, simple_tokenize


class ClipReward:
    def __init__(self, evaluator, image_embs: torch.Tensor, w: float, prefix: str = "", clamp: bool = False):
        self.evaluator, self.image_embs = evaluator, image_embs
        self.w, self.prefix, self.clamp = w, prefix, clamp

    @torch.no_grad()
    def __call__(self, captions: list[str], image_index: torch.Tensor) -> torch.Tensor:
        text = self.evaluator.embed_texts(captions, prefix=self.prefix)
        image = self.image_embs[image_index.cpu()].to(text.device, text.dtype)
        cos = (image * text).sum(-1)
        if self.clamp:
            cos = cos.clamp(min=0)
        return (self.w * cos).float().cpu()


class CiderReward:
    def __init__(self, train_refs: list[list[str]]):
        tokenized = [[simple_tokenize(r) for r in refs] for refs in train_refs]
        self.refs = tokenized
        self.scorer = CiderD(tokenized)

    def __call__(self, captions: list[str], image_index: torch.Tensor) -> torch.Tensor:
        cands = [simple_tokenize(c) for c in captions]
        refs = [self.refs[i] for i in image_index.tolist()]
        return torch.as_tensor(self.scorer.score(cands, refs), dtype=torch.float32)


def build_reward(spec_reward: dict, *, evaluators: dict, image_embs: dict, train_refs: list[list[str]]):
    """The reward a run's config names. `evaluators`/`image_embs` are keyed by clip_models name."""
    if spec_reward["type"] == "cider":
        return CiderReward(train_refs)
    name = spec_reward["model"]
    return ClipReward(evaluators[name], image_embs[name], spec_reward["w"],
                      spec_reward.get("prefix", ""), spec_reward.get("clamp", False))

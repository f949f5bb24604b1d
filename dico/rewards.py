"""Rewards for fine-tuning: a CLIP-style evaluator score or CIDEr-D, one number per candidate.

Every reward is called on the candidates' token ids, `reward(tokens [N, L], image_index [N])`, with
tokens in the captioner's ids as beam search returns them ([BOS, words, EOS, pad, ...]).

CLIP rewards follow the official training reward (official trainers/trainer_utils.py
`TrainerRewardModel` -> utils.py `compute_clip_score(..., w=2.0)`): r = w * cos(image, caption), no
text prefix, no clamp. With `input: ids` (the official path) the generated ids go straight to the
reward CLIP's text tower: BOS ... EOS as generated, every pad replaced by 0, padded with 0 to the
text context (77 for CLIP). CLIP pools the text at its highest token id, which is EOS; a beam cut at
max length has no EOS, so it is pooled at BOS (49406, the highest id left) and gets the same reward
whatever its words: a quirk of the official code that `input: ids` keeps. `input: text` decodes the
ids and re-tokenises the text (as the official *validation* does), which scores such beams by their
words. Under fp16 on a GPU (train.amp) the official reward is an fp16 number (its CLIP runs in fp16
autocast); we round the cosine to fp16 there too, which matters for ties and the loser weights.
Image embeddings of the training split are cached once (`cache_embeddings`), so a step only encodes
text.

The CIDEr-D reward uses document frequencies of the *training* references, computed once, as SCST
implementations do, with a light Python tokenizer instead of the Java PTB one.
"""
from __future__ import annotations

import torch

from .metrics.cider import CiderD, simple_tokenize
from .tokenizer import CLIP_PAD


def clip_text_ids(tokens: torch.Tensor, tok, context_length: int) -> torch.Tensor:
    """Captioner ids [N, L] -> CLIP text-tower input [N, context_length] as the official code builds
    it: CLIP ids (a compact vocabulary maps back to them), pad -> 0, right-padded with 0."""
    if tokens.size(1) > context_length:
        raise ValueError(f"candidates of {tokens.size(1)} tokens do not fit the reward CLIP's text context of "
                         f"{context_length}; lower decoding.max_len to at most {context_length}")
    clip = torch.as_tensor(tok.clip_ids, device=tokens.device)[tokens]
    clip = clip.masked_fill(clip == CLIP_PAD, 0)
    out = torch.zeros(tokens.size(0), context_length, dtype=torch.long, device=tokens.device)
    out[:, : tokens.size(1)] = clip
    return out


class ClipReward:
    def __init__(self, evaluator, image_embs: torch.Tensor, w: float, prefix: str = "", clamp: bool = False,
                 input: str = "ids", tokenizer=None, precision: str = "none"):
        if input == "ids" and prefix:
            raise ValueError("rewards: input 'ids' feeds the generated ids to CLIP as they are, so it cannot add "
                             f"a text prefix ({prefix!r}); use input: text for a prefix")
        self.evaluator, self.image_embs, self.tok = evaluator, image_embs, tokenizer
        self.w, self.prefix, self.clamp, self.input, self.precision = w, prefix, clamp, input, precision

    @torch.no_grad()
    def __call__(self, tokens: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        if self.input == "ids":
            text = self.evaluator.embed_tokens(clip_text_ids(tokens, self.tok, self.evaluator.context_length)
                                               .to(self.evaluator.device), precision=self.precision)
        else:
            text = self.evaluator.embed_texts(self.tok.decode_batch(tokens), prefix=self.prefix)
        image = self.image_embs[image_index.cpu()].to(text.device, text.dtype)
        cos = (image * text).sum(-1)
        if self.precision == "fp16":  # the official reward is computed (and returned) in fp16
            cos = cos.half().float()
        if self.clamp:
            cos = cos.clamp(min=0)
        return (self.w * cos).float().cpu()


class CiderReward:
    def __init__(self, train_refs: list[list[str]], tokenizer):
        tokenized = [[simple_tokenize(r) for r in refs] for refs in train_refs]
        self.refs, self.tok = tokenized, tokenizer
        self.scorer = CiderD(tokenized)

    def __call__(self, tokens: torch.Tensor, image_index: torch.Tensor) -> torch.Tensor:
        cands = [simple_tokenize(c) for c in self.tok.decode_batch(tokens)]
        refs = [self.refs[i] for i in image_index.tolist()]
        return torch.as_tensor(self.scorer.score(cands, refs), dtype=torch.float32)


def build_reward(spec_reward: dict, *, evaluators: dict, image_embs: dict, train_refs: list[list[str]],
                 tokenizer, max_len: int | None = None, precision: str = "none"):
    """The reward a run's config names. `evaluators`/`image_embs` are keyed by clip_models name;
    `precision` is the resolved train.amp of the device ("fp16", "bf16" or "none")."""
    if spec_reward["type"] == "cider":
        return CiderReward(train_refs, tokenizer)
    name = spec_reward["model"]
    evaluator = evaluators[name]
    if spec_reward.get("input", "ids") == "ids" and max_len is not None and max_len > evaluator.context_length:
        raise ValueError(f"reward {name}: decoding.max_len {max_len} exceeds the CLIP text context of "
                         f"{evaluator.context_length} tokens that input 'ids' feeds the candidates into")
    return ClipReward(evaluator, image_embs[name], spec_reward["w"], spec_reward.get("prefix", ""),
                      spec_reward.get("clamp", False), spec_reward.get("input", "ids"), tokenizer,
                      precision if precision == "fp16" else "none")

"""Batched beam search and greedy decoding for the Captioner.

Semantics follow the aimagelab (M²-Transformer) beam search, not HF's `generate`:

- `max_len` counts BOS (like HF max_length=30 in the official scripts): at most max_len-1 tokens
  are generated. A beam that reaches max_len without EOS ends there, with no EOS appended.
- BOS and pad are never generated. Their log-probs are set to -inf AFTER the log-softmax, so the
  scores stay the model's own log-probs and equal `sequence_logprobs` of the returned tokens.
- At step 0 only one beam per image is live, so the k first tokens are distinct.
- Each step every live beam expands over the vocabulary; a finished beam stays in the pool with a
  frozen score and is extended only by pad (log-prob 0). The top-k of the k×V candidates by
  cumulative log-prob survive. Hence, with k >= the number of possible sequences, the result is
  exactly the exhaustive top-k.
- If fewer than k sequences with finite score exist (tiny vocabularies), the missing rows are
  fillers: score -inf, tokens [BOS, pad, ...]. They always sort last.

Decoding runs in whatever mode the model is in: the caller decides. In train() mode dropout is
active and the search is stochastic (the official trainer does that; we default to eval()).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .model import Captioner


def _next_logprobs(model: Captioner, tokens: Tensor, memory: Tensor, cache) -> Tensor:
    """Log-probs [N,V] of the token after `tokens` [N,L], BOS and pad made impossible."""
    if cache is not None:
        logits = model.decode(tokens[:, -1:], None, cache)[:, -1]
    else:  # reference path: recompute the whole prefix
        logits = model.decode(tokens, memory)[:, -1]
    logp = logits.float().log_softmax(-1)
    logp[:, model.cfg.bos_id] = float("-inf")
    logp[:, model.cfg.pad_id] = float("-inf")
    return logp


@torch.no_grad()
def beam_search(
    model: Captioner, memory: Tensor, beam_size: int = 5, max_len: int = 30, use_cache: bool = True
) -> tuple[Tensor, Tensor]:
    """memory [B,T,d] -> tokens [B,k,L] (model ids: BOS, words, EOS, then pad; L <= max_len),
    scores [B,k] = sum of token log-probs of each sequence (EOS included), sorted best first.

    `use_cache=False` recomputes the full prefix every step; results are the same.
    """
    cfg, k = model.cfg, beam_size
    B, dev = memory.size(0), memory.device
    N = B * k  # rows are image-major: row b*k + j is beam j of image b
    cache = model.new_cache(memory) if use_cache else None  # one memory K/V per image, shared by its beams
    mem = None if use_cache else memory.repeat_interleave(k, dim=0)
    tokens = torch.full((N, 1), cfg.bos_id, dtype=torch.long, device=dev)
    scores = torch.full((B, k), float("-inf"), device=dev)
    scores[:, 0] = 0.0  # one live beam per image at step 0, so the k first tokens differ
    finished = torch.zeros(N, dtype=torch.bool, device=dev)
    base = torch.arange(B, device=dev).unsqueeze(1) * k

    for step in range(max_len - 1):
        if step == 0 and cache is not None:
            # the k rows of an image are identical at step 0: run the decoder on one row per
            # image, then give each beam its copy of the (one-position) self-attention cache
            logp = _next_logprobs(model, tokens[::k], None, cache).repeat_interleave(k, dim=0)
            cache.repeat_interleave(k)
        else:
            logp = _next_logprobs(model, tokens, mem, cache)
        # in place (the [N, V] log-probs are the largest tensors of a step) and without a host
        # sync: a finished beam can only grow a free pad
        logp.masked_fill_(finished.unsqueeze(1), float("-inf"))
        logp[:, cfg.pad_id].masked_fill_(finished, 0.0)
        cand = logp.add_(scores.view(N, 1)).view(B, k * cfg.vocab_size)
        scores, idx = cand.topk(k, dim=1)  # sorted, best first
        rows = (base + idx // cfg.vocab_size).view(N)  # the beam each survivor extends
        new = (idx % cfg.vocab_size).view(N, 1)
        tokens = torch.cat([tokens[rows], new], dim=1)
        # -inf rows are fillers (fewer than k sequences exist): retire them as well.
        finished = finished[rows] | (new.squeeze(1) == cfg.eos_id) | scores.view(N).isneginf()
        if cache is not None:
            cache.reorder(rows, cross=False)  # beams never leave their image: cross K/V unchanged
        if finished.all():
            break

    tokens[scores.view(N).isneginf(), 1:] = cfg.pad_id  # fillers carry no tokens
    return tokens.view(B, k, -1), scores


@torch.no_grad()
def greedy(model: Captioner, memory: Tensor, max_len: int = 30, use_cache: bool = True) -> Tensor:
    """memory [B,T,d] -> tokens [B,L]: argmax each step, same layout and max_len as beam_search
    (identical to beam_size=1). Stops when every row has emitted EOS."""
    cfg, B, dev = model.cfg, memory.size(0), memory.device
    cache = model.new_cache(memory) if use_cache else None
    tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_len - 1):
        new = _next_logprobs(model, tokens, memory, cache).argmax(-1)
        new = new.masked_fill(finished, cfg.pad_id)
        tokens = torch.cat([tokens, new.unsqueeze(1)], dim=1)
        finished |= new == cfg.eos_id
        if finished.all():
            break
    return tokens

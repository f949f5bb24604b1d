"""Batched beam search and greedy decoding for the Captioner.

`beam_search(..., style=...)` offers two rule sets; `decoding.style` in the config picks one for
generation, validation and fine-tuning candidates alike.

style="hf" (the paper's default): Hugging Face beam search as transformers 4.20 runs it, which is
what the official code calls (official utils.py `generate_with_backpropagation` +
`CustomBeamSearchScorer` for DiCO candidates; plain `generate` with 4.20's `BeamSearchScorer` for
test decoding; both keep hypotheses in 4.20's `generation_beam_search.BeamHypotheses`). The rules:

- Start: k copies of [BOS] per image with running sums [0, -1e9, ..., -1e9], so the first step
  expands beam 0 only (the -1e9 beams' candidates only matter when V < 2k).
- Every step: the log-softmax of the last logits, nothing masked (HF masks neither BOS nor pad;
  a trained captioner gives them ~0 probability since neither is ever a target), plus the beam's
  running sum. Of the k*V candidates of an image the best 2k are taken, best first.
- The walk over those 2k in rank order: a candidate ending in EOS goes to the image's finished
  hypotheses only if its rank is < k (an EOS of rank >= k is dropped); every other candidate
  becomes a live beam, until k live beams are taken. So the k live beams never end in EOS.
- A finished hypothesis is its prefix WITHOUT the EOS, scored sum_logprobs / len(prefix)**lp, where
  len counts BOS and the words. An image keeps the k best (a new one enters while fewer than k are
  kept or when it beats the worst, which then leaves).
- Done test, once per step after the walk: an image is done when it keeps k hypotheses and the
  worst of them is >= best / cur_len**lp, with best = the best of the 2k candidate sums of this step
  (EOS ones included) and cur_len = the prefix length before the new token (BOS counted).
  early_stopping is False, as in the official scripts. A done image takes no more hypotheses.
- The loop ends when every image is done or the sequences hold max_len tokens (BOS counted). Then
  every live beam of an image not done is offered to its hypotheses with score sum / max_len**lp.
- Result: the hypotheses sorted by score, best first (ties: the later-added first, like 4.20's stable
  sort + pop). A finished one gets its EOS back, then pad; one cut at max_len has no EOS.
  `scores` are these normalised scores.

transformers 5.x (`generation/utils.py` `_beam_search`, checked in 5.24) differs in two rules, so its
`generate()` is a reference only where neither decides (tests/test_decoding.py):
  (1) the done test's `best` is the best running (non-EOS) beam's sum, not the best of all 2k
      candidates (`_check_early_stop_heuristic`; same denominator cur_len, since 5.x divides by
      the new length minus the prompt): it can stop earlier when the top candidate is an EOS;
  (2) at the last step every candidate of rank < k is finished there, normalised by max_len - 1
      (the prompt is not counted), and no others: 4.20 instead offers the k best non-EOS candidates
      (ranks >= k included) with sum / max_len**lp.

Numerics: the finished hypotheses' scores are kept in float64, as 4.20's `BeamSearchScorer` does
(`next_score.item()` is a Python float), and returned as float32. The official DiCO candidates go
through `CustomBeamSearchScorer`, which keeps float32 tensors instead (same decisions up to ties at
float32 rounding). Log-softmax runs in float32 even for an fp16 model (4.20 takes it in the model's
dtype).

style="m2": the aimagelab M²-Transformer beam search (our earlier default, not the official one):

- BOS and pad are never generated: their log-probs are set to -inf AFTER the log-softmax, so the
  scores stay the model's own log-probs and equal `sequence_logprobs` of the returned tokens.
- At step 0 only one beam per image is live, so the k first tokens are distinct.
- Each step every live beam expands over the vocabulary; a finished beam stays in the pool with a
  frozen score and is extended only by pad (log-prob 0). The top-k of the k×V candidates by
  cumulative log-prob survive: ranked by raw sums, which favours short captions. With k >= the
  number of possible sequences, the result is exactly the exhaustive top-k.
- If fewer than k sequences with finite score exist (tiny vocabularies), the missing rows are
  fillers: score -inf, tokens [BOS, pad, ...]. They always sort last.
- `scores` are raw sums of token log-probs (EOS included); no length penalty.

Both: `max_len` counts BOS (like HF max_length=30 in the official scripts), so at most max_len-1
tokens are generated; tokens are [BOS, words..., EOS, pad...] (no EOS when cut at max_len), L <=
max_len. Decoding runs in whatever mode the model is in: the caller decides. In train() mode
dropout is active and the search is stochastic (the official trainer does that; we default to eval()).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .model import Captioner

STYLES = ("hf", "m2")
HF_INIT = -1e9  # 4.20's running sum of the beams 1..k-1 at the start


def _next_logprobs(model: Captioner, tokens: Tensor, memory: Tensor | None, cache, mask_special: bool) -> Tensor:
    """Log-probs [N,V] (float32) of the token after `tokens` [N,L]; m2 makes BOS and pad impossible."""
    if cache is not None:
        logits = model.decode(tokens[:, -1:], None, cache)[:, -1]
    else:  # reference path: recompute the whole prefix
        logits = model.decode(tokens, memory)[:, -1]
    logp = logits.float().log_softmax(-1)
    if mask_special:
        logp[:, model.cfg.bos_id] = float("-inf")
        logp[:, model.cfg.pad_id] = float("-inf")
    return logp


def _first_step(model: Captioner, tokens: Tensor, k: int, cache, mem, mask_special: bool) -> Tensor:
    """Log-probs of step 0. With the cache, the k rows of an image are identical: run the decoder on
    one row per image, then give each beam its copy of the (one-position) self-attention cache."""
    if cache is None:
        return _next_logprobs(model, tokens, mem, None, mask_special)
    logp = _next_logprobs(model, tokens[::k], None, cache, mask_special).repeat_interleave(k, dim=0)
    cache.repeat_interleave(k)
    return logp


def beam_search(model: Captioner, memory: Tensor, beam_size: int = 5, max_len: int = 30, style: str = "hf",
                length_penalty: float = 1.0, use_cache: bool = True) -> tuple[Tensor, Tensor]:
    """memory [B,T,d] -> tokens [B,k,L] (model ids: BOS, words, EOS, then pad; L <= max_len) and
    scores [B,k], best first, k = beam_size. `style` picks the rules (module docstring): "hf" scores
    are HF's normalised sum_logprobs / len**length_penalty, "m2" scores are raw sums of token
    log-probs (EOS included). `use_cache=False` recomputes the full prefix every step; same results.
    """
    if style == "hf":
        return _beam_hf(model, memory, beam_size, max_len, float(length_penalty), use_cache)
    if style == "m2":
        if length_penalty != 1.0:
            raise ValueError(f"decoding.length_penalty is {length_penalty}, but decoding.style m2 ranks by raw "
                             "sums and has no length penalty: set decoding.length_penalty to 1.0 or use style hf")
        return _beam_m2(model, memory, beam_size, max_len, use_cache)
    raise ValueError(f"decoding.style is {style!r}; use one of {', '.join(STYLES)}")


# -- style "hf" ------------------------------------------------------------------------------------
class _Hypotheses:
    """The k best finished hypotheses of every image, as tensors (no Python loop over images).

    score [B,k] float64 (-inf = empty slot), tokens [B,k,max_len] (final form: EOS included, pad
    after), length [B,k], age [B,k] (order of insertion, for HF's tie rules), count [B]."""

    def __init__(self, B: int, k: int, max_len: int, pad_id: int, device):
        self.k = k
        self.score = torch.full((B, k), float("-inf"), dtype=torch.float64, device=device)
        self.tokens = torch.full((B, k, max_len), pad_id, dtype=torch.long, device=device)
        self.length = torch.zeros((B, k), dtype=torch.long, device=device)
        self.age = torch.zeros((B, k), dtype=torch.long, device=device)
        self.count = torch.zeros(B, dtype=torch.long, device=device)
        self.clock = 0

    def worst(self) -> Tensor:
        return self.score.min(dim=1).values

    def offer(self, ok: Tensor, score: Tensor, tokens: Tensor, length: Tensor) -> None:
        """Offer n candidates per image ([B,n] each, tokens [B,n,max_len]) in order; `ok` marks the
        real ones. The k best of kept + offered stay: what 4.20's one-by-one `add` keeps (a newcomer
        equal to the worst of a full heap is refused: the stable sort keeps the older one)."""
        B, n = ok.shape
        score = score.masked_fill(~ok, float("-inf"))
        age = self.clock + torch.arange(n, device=ok.device).expand(B, n)
        self.clock += n
        keep = torch.cat([self.score, score], 1).sort(dim=1, descending=True, stable=True).indices[:, : self.k]
        self.score = torch.cat([self.score, score], 1).gather(1, keep)
        self.length = torch.cat([self.length, length], 1).gather(1, keep)
        self.age = torch.cat([self.age, age], 1).gather(1, keep)
        toks = torch.cat([self.tokens, tokens], 1)
        self.tokens = toks.gather(1, keep.unsqueeze(-1).expand(-1, -1, toks.size(-1)))
        self.count = (self.count + ok.sum(1)).clamp_(max=self.k)

    def best_first(self) -> tuple[Tensor, Tensor, Tensor]:
        """tokens, scores (float32), lengths sorted by score, best first; among equal scores the
        later-added first (4.20 sorts ascending with a stable sort and pops from the end)."""
        order = self.age.argsort(dim=1, descending=True, stable=True)
        order = order.gather(1, self.score.gather(1, order).argsort(dim=1, descending=True, stable=True))
        tokens = self.tokens.gather(1, order.unsqueeze(-1).expand_as(self.tokens))
        return tokens, self.score.gather(1, order).float(), self.length.gather(1, order)


@torch.no_grad()
def _beam_hf(model: Captioner, memory: Tensor, k: int, max_len: int, lp: float, use_cache: bool):
    cfg = model.cfg
    assert max_len >= 2, "max_len counts BOS: at least 2"
    B, V, dev = memory.size(0), cfg.vocab_size, memory.device
    N = B * k  # rows are image-major: row b*k + j is beam j of image b
    cache = model.new_cache(memory) if use_cache else None  # one memory K/V per image, shared by its beams
    mem = None if use_cache else memory.repeat_interleave(k, dim=0)
    seqs = torch.full((N, max_len), cfg.pad_id, dtype=torch.long, device=dev)  # live beams, grown in place
    seqs[:, 0] = cfg.bos_id
    sums = torch.full((B, k), HF_INIT, device=dev)
    sums[:, 0] = 0.0
    hyps = _Hypotheses(B, k, max_len, cfg.pad_id, dev)
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    base = torch.arange(B, device=dev).unsqueeze(1) * k
    ranks = torch.arange(2 * k, device=dev)

    for cur in range(1, max_len):  # cur = tokens so far (BOS counted) = the new token's position
        if cur == 1:
            logp = _first_step(model, seqs[:, :1], k, cache, mem, mask_special=False)
        else:
            logp = _next_logprobs(model, seqs[:, :cur], mem, cache, mask_special=False)
        cand = logp.add_(sums.view(N, 1)).view(B, k * V)
        top, idx = cand.topk(2 * k, dim=1)  # sorted, best first
        beam, tok = idx // V, idx % V
        is_eos = tok == cfg.eos_id
        # an EOS of rank < k finishes a hypothesis: the prefix (cur tokens), then EOS in the output;
        # an EOS of rank >= k is dropped
        fin = is_eos[:, :k] & ~done.unsqueeze(1)
        prefix = seqs.view(B, k, max_len).gather(1, beam[:, :k, None].expand(B, k, max_len))
        prefix[:, :, cur] = cfg.eos_id
        hyps.offer(fin, top[:, :k].double() / cur ** lp, prefix, torch.full_like(beam[:, :k], cur + 1))
        # the k best non-EOS candidates, in rank order, are the live beams
        live = (ranks + 2 * k * is_eos).topk(k, dim=1, largest=False).indices
        sums = top.gather(1, live)
        rows = (base + beam.gather(1, live)).view(N)
        seqs = seqs.index_select(0, rows)
        seqs[:, cur] = tok.gather(1, live).view(N)
        if cache is not None:
            cache.reorder(rows, cross=False)  # beams never leave their image: cross K/V unchanged
        done |= (hyps.count == k) & (hyps.worst() >= top[:, 0].double() / cur ** lp)
        if bool(done.all()):
            break
    else:  # max_len reached: the live beams of the images not done are offered, cut (no EOS)
        hyps.offer(~done.unsqueeze(1).expand(B, k), sums.double() / max_len ** lp, seqs.view(B, k, max_len),
                   torch.full((B, k), max_len, dtype=torch.long, device=dev))

    tokens, scores, length = hyps.best_first()
    return tokens[:, :, : int(length.max())], scores


# -- style "m2" ------------------------------------------------------------------------------------
@torch.no_grad()
def _beam_m2(model: Captioner, memory: Tensor, k: int, max_len: int, use_cache: bool):
    cfg = model.cfg
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
        if step == 0:
            logp = _first_step(model, tokens, k, cache, mem, mask_special=True)
        else:
            logp = _next_logprobs(model, tokens, mem, cache, mask_special=True)
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
    """memory [B,T,d] -> tokens [B,L]: argmax each step with BOS/pad masked (as style m2), same
    layout and max_len as beam_search (identical to m2 with beam_size=1). Stops when every row has
    emitted EOS."""
    cfg, B, dev = model.cfg, memory.size(0), memory.device
    cache = model.new_cache(memory) if use_cache else None
    tokens = torch.full((B, 1), cfg.bos_id, dtype=torch.long, device=dev)
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    for _ in range(max_len - 1):
        new = _next_logprobs(model, tokens, memory, cache, mask_special=True).argmax(-1)
        new = new.masked_fill(finished, cfg.pad_id)
        tokens = torch.cat([tokens, new.unsqueeze(1)], dim=1)
        finished |= new == cfg.eos_id
        if finished.all():
            break
    return tokens

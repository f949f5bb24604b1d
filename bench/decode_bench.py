"""Beam search: dico.decoding.beam_search with the KV cache vs recomputing the prefix every step.

The paper-size captioner (d=512, 3+3 layers, 8 heads, d_ff 2048) with a 10k-token vocabulary (the
paper predicts CLIP's 49,409 BPE ids; 10k keeps the CPU time of the LM head reasonable, and the LM
head costs the same on both sides) on random encoder memories [4, T, 512] (T = 257 as ViT-L/14's
grid; --quick: T = 50 as ViT-B/32's). Beam 5, max_len 30 (29 generated tokens): the EOS row of the
tied embedding is zeroed so no beam ends early (see common.paper_captioner), and the run checks that
every beam has the full length. The time is beam search alone (the encoder runs once, outside).

beam_styles: decoding.style hf (transformers 4.20's rules, the paper's) vs m2 at the paper's shapes,
CLIP's full 49,409-token vocabulary, 257-token memories, beam 5, max_len 30, EOS pinned as above so
both run all 29 steps; interleaved in one process, so the ratio holds on a loaded machine.
"""
from __future__ import annotations

import torch

from common import interleaved, paper_captioner

VOCAB = 10_000


def _memory(model, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        return model.encode(torch.randn(B, T, model.cfg.feat_dim, generator=g))


def _check_full_length(model, tokens: torch.Tensor, max_len: int) -> None:
    assert tokens.size(-1) == max_len and not (tokens == model.cfg.eos_id).any(), \
        "a beam ended early: the EOS bias did not hold, the work per run is not fixed"


def bench_beam(quick: bool, B: int | None = None, T: int | None = None, k: int = 5, max_len: int = 30,
               repeats: int | None = None) -> str:
    from dico.decoding import beam_search

    B = B or 4
    T = T or (50 if quick else 257)
    repeats = repeats or 3
    model = paper_captioner(VOCAB)
    memory = _memory(model, B, T)
    cached, scores = beam_search(model, memory, beam_size=k, max_len=max_len)
    plain, plain_scores = beam_search(model, memory, beam_size=k, max_len=max_len, use_cache=False)
    _check_full_length(model, cached, max_len)
    assert torch.equal(cached, plain), "cached and uncached beam search disagree"
    torch.testing.assert_close(scores, plain_scores, atol=1e-3, rtol=1e-5)
    t = interleaved({"plain": lambda: beam_search(model, memory, beam_size=k, max_len=max_len, use_cache=False),
                     "cached": lambda: beam_search(model, memory, beam_size=k, max_len=max_len)},
                    repeats, warmup=0)
    return (f"beam: batched beam search (beam {k}, {max_len - 1} steps forced: EOS logit pinned at 0) of the "
            f"paper-size captioner (d=512, 3+3 layers, vocab {VOCAB // 1000}k) on {B} images x {T}-token memories, "
            f"KV cache (self K/V appended, cross K/V projected once per image and shared by its beams) vs "
            f"recomputing the prefix and cross K/V each step (use_cache=False), same tokens; median of {repeats} "
            f"({t['plain']:.2f} s vs {t['cached']:.2f} s, {B / t['cached']:.1f} images/s cached) "
            f"{t['plain'] / t['cached']:.1f}x")


def bench_beam_styles(quick: bool, B: int | None = None, T: int = 257, k: int = 5, max_len: int = 30,
                      repeats: int | None = None) -> str:
    """style hf vs style m2, same model and memories; the line ends with t(m2) / t(hf)."""
    from dico.decoding import beam_search
    from dico.tokenizer import CLIP_VOCAB

    B = B or (16 if quick else 32)
    repeats = repeats or 3
    model = paper_captioner(CLIP_VOCAB)
    memory = _memory(model, B, T)
    run = {style: (lambda style=style: beam_search(model, memory, beam_size=k, max_len=max_len, style=style))
           for style in ("m2", "hf")}
    for style, fn in run.items():
        _check_full_length(model, fn()[0], max_len)
    t = interleaved(run, repeats, warmup=0)
    return (f"beam_styles: beam search of the paper-size captioner (d=512, 3+3 layers, vocab {CLIP_VOCAB}) on {B} "
            f"images x {T}-token memories, beam {k}, {max_len - 1} steps (EOS pinned), decoding.style m2 vs hf "
            f"(4.20 rules: top 2k, tensor hypothesis heaps); median of {repeats} ({t['m2']:.2f} s vs {t['hf']:.2f} s: "
            f"hf takes {t['hf'] / t['m2']:.2f} of m2's time) t(m2)/t(hf) {t['m2'] / t['hf']:.2f}x")


def scaling_beam(quick: bool) -> list[str]:
    """Cached beam search time vs beam size k (fixed B) and vs batch B (fixed k)."""
    from dico.decoding import beam_search

    T, max_len = (50, 30)
    repeats = 3 if quick else 5
    model = paper_captioner(VOCAB)
    lines = []
    B = 8
    memory = _memory(model, B, T)
    ks = (1, 3, 5)
    t = interleaved({kk: (lambda kk=kk: beam_search(model, memory, beam_size=kk, max_len=max_len)) for kk in ks},
                    repeats)
    lines.append(f"scaling_beam_k: cached beam search, {B} images x {T}-token memories, {max_len - 1} steps, "
                 f"vocab {VOCAB // 1000}k; seconds at k=1/3/5: " + " / ".join(f"{t[kk]:.3f}" for kk in ks)
                 + f"; per beam-row-step: " + " / ".join(f"{t[kk] / (B * kk * (max_len - 1)) * 1e3:.2f} ms" for kk in ks)
                 + f"; t(k=5)/t(k=1) {t[5] / t[1]:.1f}x")
    Bs = (4, 8, 16)
    mems = {b: _memory(model, b, T) for b in Bs}
    t = interleaved({b: (lambda b=b: beam_search(model, mems[b], beam_size=5, max_len=max_len)) for b in Bs}, repeats)
    lines.append(f"scaling_beam_batch: cached beam search, beam 5, {T}-token memories; seconds at B=4/8/16 images: "
                 + " / ".join(f"{t[b]:.3f}" for b in Bs) + "; images/s: "
                 + " / ".join(f"{b / t[b]:.1f}" for b in Bs) + f"; t(16)/t(4) {t[16] / t[4]:.1f}x")
    return lines

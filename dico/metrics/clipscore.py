"""CLIP-S / RefCLIP-S and PAC-S / RefPAC-S: the official definitions, per caption and over a corpus,
and the two other forms of the same cosine the official DiCO code uses (the training reward and the
checkpoint selection's validation form).

CLIP-S: CLIPScore (Hessel et al. 2021); PAC-S: pacscore evaluation/pac_score/pac_score.py. Both embed
the candidates and the references with the prefix "A photo depicts " (`PACS_PREFIX`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..clip_model import Evaluator

PACS_PREFIX = "A photo depicts "


def clip_scores(image_embs: torch.Tensor, cand_embs: torch.Tensor, ref_embs=None, w: float = 2.5) -> dict:
    """Per-caption CLIP-S / PAC-S and, with references, RefCLIP-S / RefPAC-S (CLIPScore and pacscore's definitions).

        s   = w · max(cos(I, c), 0)                  (w = 2.5 CLIP-S, 2.0 PAC-S)
        t   = max_r cos(c, r)                        (raw: no clamp, no w, as in both official codes)
        ref = 2·s·t / (s + t)                        (harmonic mean)

    Guard: where s + t == 0 the official code divides 0/0 (or x/0) and returns NaN/inf, which then
    poisons the corpus mean; we return 0 there and the official value everywhere else (including
    its odd sign when t < 0, which real CLIP text-text cosines practically never reach).
    Embeddings must be L2-normalised; `ref_embs` is a list of [R_i, D] or a tensor [N, R, D].
    """
    s = w * (image_embs * cand_embs).sum(-1).clamp(min=0)
    out = {"score": s}
    if ref_embs is not None:
        t = max_ref_cosine(cand_embs, ref_embs)
        denom = s + t
        out["ref_score"] = torch.where(denom != 0, 2 * s * t / torch.where(denom != 0, denom, 1), 0.0)
    return out


def max_ref_cosine(cand_embs: torch.Tensor, ref_embs) -> torch.Tensor:
    """t_i = max_r cos(c_i, r) over the references of caption i (padded to a [N, R, D] batch)."""
    if isinstance(ref_embs, torch.Tensor):
        refs, mask = ref_embs, torch.ones(ref_embs.shape[:2], dtype=torch.bool, device=ref_embs.device)
    else:
        if any(len(r) == 0 for r in ref_embs):
            raise ValueError("every candidate needs at least one reference")
        refs = torch.nn.utils.rnn.pad_sequence(list(ref_embs), batch_first=True)
        lens = torch.tensor([len(r) for r in ref_embs], device=refs.device)
        mask = torch.arange(refs.shape[1], device=refs.device)[None] < lens[:, None]
    sims = torch.einsum("nd,nrd->nr", cand_embs, refs.to(cand_embs))
    return sims.masked_fill(~mask, float("-inf")).max(1).values


def reward_scores(image_embs: torch.Tensor, cand_embs: torch.Tensor, w: float = 2.0) -> torch.Tensor:
    """The training reward of the official DiCO code (official utils.py compute_clip_score): r = w · cos(I, c), with no
    clamp at 0 (and, in training, no prefix: the caller embeds with prefix='')."""
    return w * (image_embs * cand_embs).sum(-1)


def score_captions(evaluator: Evaluator, pixels_or_image_embs: torch.Tensor, candidates: list[str],
                   refs: list[list[str]] | None, *, w: float, prefix: str = PACS_PREFIX,
                   batch_size: int = 256, ref_embs: torch.Tensor | None = None) -> dict:
    """Corpus CLIP-S/PAC-S (mean over captions) and, with refs, RefCLIP-S/RefPAC-S, plus per-caption
    lists. Candidates and references get the same prefix (as pacscore does). `ref_embs`: the flat
    references' `embed_texts(..., prefix)` computed before (`reference_embeddings`), for references
    scored again and again (a validation set)."""
    x = pixels_or_image_embs
    img = evaluator.embed_images(x, batch_size) if x.dim() == 4 else F.normalize(x.float(), dim=-1)
    if len(img) != len(candidates):
        raise ValueError(f"{len(img)} images but {len(candidates)} candidate captions")
    cand = evaluator.embed_texts(candidates, prefix, batch_size)
    per_image = None
    if refs is not None:
        if len(refs) != len(candidates):
            raise ValueError(f"{len(refs)} reference lists but {len(candidates)} candidate captions")
        per_image = _per_image(evaluator, refs, prefix, batch_size, ref_embs)
    scores = clip_scores(img.to(cand.device), cand, per_image, w)
    out = {"score": scores["score"].mean().item(), "score_per_caption": scores["score"].tolist()}
    if "ref_score" in scores:
        out["ref_score"] = scores["ref_score"].mean().item()
        out["ref_score_per_caption"] = scores["ref_score"].tolist()
    return out


def reference_embeddings(evaluator: Evaluator, refs: list[list[str]], prefix: str = PACS_PREFIX,
                         batch_size: int = 256) -> torch.Tensor:
    """The references of every image, flattened in order, embedded with `prefix`: [sum of lens, D]."""
    return evaluator.embed_texts([r for rs in refs for r in rs], prefix, batch_size)


def _per_image(evaluator: Evaluator, refs: list[list[str]], prefix: str, batch_size: int,
               ref_embs: torch.Tensor | None) -> list[torch.Tensor]:
    """Each image's reference embeddings [R_i, D]: `ref_embs` (from `reference_embeddings`) or computed."""
    flat = reference_embeddings(evaluator, refs, prefix, batch_size) if ref_embs is None else ref_embs
    n = sum(len(rs) for rs in refs)
    if len(flat) != n:
        raise ValueError(f"{len(flat)} reference embeddings for {n} references")
    return list(flat.split([len(rs) for rs in refs]))


def score_captions_validation_form(evaluator: Evaluator, image_embs: torch.Tensor, candidates: list[str],
                                   refs: list[list[str]], *, w: float, batch_size: int = 256,
                                   ref_embs: torch.Tensor | None = None) -> dict:
    """CLIP-S / PAC-S and their Ref-variants as the official trainer computes them to select a
    checkpoint (official utils.py `clip_score_from_predictions` -> `compute_clip_score(ref=True)`):
    no text prefix, the candidate cosine NOT clamped, the best reference cosine clamped at 0,

        s = w * cos(I, c),   t = max(max_r cos(c, r), 0),   Ref = 2 s t / (s + t)

    (0 where s + t = 0). Unlike `score_captions` (the reported metrics' form) s may be negative.
    `ref_embs`: `reference_embeddings(evaluator, refs, "")` computed before."""
    img = F.normalize(image_embs.float(), dim=-1)
    if not (len(img) == len(candidates) == len(refs)):
        raise ValueError(f"{len(img)} images, {len(candidates)} candidates and {len(refs)} reference lists")
    cand = evaluator.embed_texts(candidates, "", batch_size)
    t = max_ref_cosine(cand, _per_image(evaluator, refs, "", batch_size, ref_embs)).clamp(min=0)
    s = w * (img.to(cand.device) * cand).sum(-1)
    denom = s + t
    ref = torch.where(denom != 0, 2 * s * t / torch.where(denom != 0, denom, 1), 0.0)
    return {"score": s.mean().item(), "ref_score": ref.mean().item(),
            "score_per_caption": s.tolist(), "ref_score_per_caption": ref.tolist()}

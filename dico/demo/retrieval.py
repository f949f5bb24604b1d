"""How well a CLIP stand-in sees the demo's scenes: retrieval R@1 both ways, and the swap test."""
from __future__ import annotations

import torch

from ..clip_model import Evaluator
from ..metrics.cider import simple_tokenize
from .language import describes, swapped


def retrieval(ev: Evaluator, pixels: torch.Tensor, captions: list[list[str]], scenes=None) -> dict:
    """R@1 both ways over a set's images and all their captions: i2t_r1 = share of images whose top
    caption is true of them, t2i_r1 = share of captions whose top image they are true of.

    Generated data repeats itself: two val scenes may each hold one big red circle, on white and on
    grey, and "there is a big red circle" is then true of both. With the images' `scenes`
    (`dico.demo.Scene`), a hit is a caption the scene makes true (`dico.demo.describes`); without,
    one of the image's own caption texts (then a caption true of another image counts as a miss unless
    that image's references hold the same text). Both are returned: "i2t_r1" / "t2i_r1" by truth
    when scenes are given, "i2t_r1_refs" / "t2i_r1_refs" by reference text always."""
    flat = [c for caps in captions for c in caps]
    sims = ev.embed_images(pixels) @ ev.embed_texts(flat).T     # [images, captions]
    top_text, top_image = sims.argmax(1).tolist(), sims.argmax(0).tolist()
    n_img, n_txt = max(1, len(captions)), max(1, len(flat))
    i2t_refs = sum(flat[t] in caps for t, caps in zip(top_text, captions)) / n_img
    t2i_refs = sum(text in captions[i] for text, i in zip(flat, top_image)) / n_txt
    if scenes is None:
        i2t, t2i, hits = i2t_refs, t2i_refs, "reference texts"
    else:
        i2t = sum(describes(flat[t], sc) for t, sc in zip(top_text, scenes)) / n_img
        t2i = sum(describes(text, scenes[i]) for text, i in zip(flat, top_image)) / n_txt
        hits = "captions true of the scene"
    return {"i2t_r1": i2t, "t2i_r1": t2i, "i2t_r1_refs": i2t_refs, "t2i_r1_refs": t2i_refs, "hits": hits,
            "images": len(captions), "captions": len(flat)}


def swap_test(ev: Evaluator, pixels: torch.Tensor, captions: list[list[str]]) -> dict:
    """How the model reacts when a caption's attributes or the sides of its relation are swapped
    (`dico.demo.swapped`: the swapped caption describes another scene). Per kind: the number of
    (image, caption) pairs, the mean cosine drop (original - swapped) x100, and the % of pairs where
    the original scores higher (50 = blind to the swap). The paper's premise: CLIP-based scores are
    partly blind to word order and binding, PAC-S's training less so."""
    pairs = {"attributes": [], "relation": []}
    for i, caps in enumerate(captions):
        for c in caps:
            for kind, text in swapped(c).items():
                if text:
                    pairs[kind].append((i, simple_tokenize(c), text))
    image_embs = ev.embed_images(pixels)
    out = {}
    for kind, rows in pairs.items():
        if not rows:
            out[kind] = {"pairs": 0, "cos_drop_x100": None, "prefers_original_pct": None}
            continue
        img = image_embs[[i for i, _, _ in rows]]
        orig = (img * ev.embed_texts([o for _, o, _ in rows])).sum(-1)
        swap = (img * ev.embed_texts([t for _, _, t in rows])).sum(-1)
        drop = orig - swap
        out[kind] = {"pairs": len(rows), "cos_drop_x100": round(100 * float(drop.mean()), 3),
                     "prefers_original_pct": round(100 * float((drop > 0).float().mean()), 1)}
    return out

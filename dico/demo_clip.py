"""The demo's CLIP stand-ins: tiny open_clip models trained on the demo data (`dico train-clip`).

They play every CLIP role of the paper's pipeline in the demo (frozen backbone, reward model, CLIP-S
and PAC-S scorer; "pac" is trained with hard negatives, the stand-in for PAC-S's stronger training).
They are saved in the PAC-S checkpoint layout and loaded back through `dico.evaluator.load_evaluator`,
the loader of the real checkpoints, so the demo exercises the real loading path. Demo-only: nothing
here serves a real checkpoint.
"""
from __future__ import annotations

import math
import random
import sys
import time
from typing import Callable

import torch
import torch.nn.functional as F

from .evaluator import (CLIP_MEAN, CLIP_STD, HEAD_WIDTH, Evaluator, clip_preprocess, encode_text_prefix, save_evaluator,
                        tokenize)

# Length groups of a training batch's texts (`encode_text_prefix`): demo captions are 15 BPE tokens on
# average and a batch's longest ~26, so one prefix for all wastes about half the text tower's work. A
# `pac` training step (128 images + 256 texts): one prefix 190 ms, 3 groups 141 ms (1.35x); 2, 4 or 6
# groups 144-149 ms (bench/demo_bench.py, 1 thread).
TEXT_BUCKETS = 3


def tiny_clip_config(embed_dim: int, image_size: int, patch_size: int, vision_width: int, vision_layers: int,
                     text_width: int, text_layers: int, context_length: int, vocab_size: int = 49408) -> dict:
    """An open_clip model config (the JSON schema of open_clip/model_configs) of an OpenAI-layout CLIP."""
    for name, width in (("vision_width", vision_width), ("text_width", text_width)):
        if width % HEAD_WIDTH or width <= 0:
            raise ValueError(f"{name}={width}: must be a positive multiple of {HEAD_WIDTH}, because the "
                             f"OpenAI-format loader infers heads = width // {HEAD_WIDTH}")
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} is not a multiple of patch_size={patch_size}")
    return {
        "embed_dim": embed_dim,
        "quick_gelu": True,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size, "width": vision_width,
                       "layers": vision_layers, "head_width": HEAD_WIDTH},
        "text_cfg": {"context_length": context_length, "vocab_size": vocab_size, "width": text_width,
                     "heads": text_width // HEAD_WIDTH, "layers": text_layers},
    }


def build_tiny_clip(cfg: dict, seed: int):
    """Randomly initialised open_clip CLIP from a config dict. The direct constructor gives the same
    module names as open_clip.create_model, and with QuickGELU the OpenAI ones; the seed is local."""
    from open_clip.model import CLIP

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CLIP(cfg["embed_dim"], dict(cfg["vision_cfg"]), dict(cfg["text_cfg"]),
                    quick_gelu=cfg.get("quick_gelu", True))


def preprocess_all(images, size: int) -> torch.Tensor:
    """`clip_preprocess` of every PIL image -> [N, 3, size, size], bit for bit. Images already size x size
    RGB (the demo's: clip_preprocess's resize and crop leave them as they are) go through its
    to-tensor and normalisation as one tensor operation, ~10x faster than one call per image."""
    import numpy as np

    if not all(im.mode == "RGB" and im.size == (size, size) for im in images):
        return torch.stack([clip_preprocess(im, size) for im in images])
    x = torch.from_numpy(np.stack([np.asarray(im) for im in images])).permute(0, 3, 1, 2).float().div(255)
    return x.sub(torch.tensor(CLIP_MEAN).view(1, 3, 1, 1)).div(torch.tensor(CLIP_STD).view(1, 3, 1, 1))


class CompactTokenTable(torch.nn.Module):
    """The rows of a CLIP token table that a training run can meet, trained in its place.

    CLIP's table has 49,408 rows (the BPE vocabulary); the demo's captions use about a hundred. AdamW
    updates every row of a dense table at every step, and for a row that never gets a gradient that
    update is only the decoupled weight decay, p <- p (1 - lr_t wd). So training these rows alone and
    then multiplying the others by the product of those factors (`write_back`) gives the dense run's
    table (tests/test_evaluator.py checks it against torch's AdamW on the full table), for a third of
    the cost of a tiny CLIP's step.
    """

    def __init__(self, full: torch.nn.Embedding, ids: torch.Tensor):
        super().__init__()
        self.ids = torch.unique(ids)
        self.remap = torch.full((full.num_embeddings,), -1, dtype=torch.long)
        self.remap[self.ids] = torch.arange(len(self.ids))
        self.weight = torch.nn.Parameter(full.weight.detach()[self.ids].clone())
        self.decay = 1.0  # product of (1 - lr_t wd) over the steps: what AdamW did to the other rows

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        compact = self.remap[tokens]
        if (compact < 0).any():
            missing = sorted(set(tokens[compact < 0].tolist()))
            raise ValueError(f"token ids {missing[:10]} are not in the compact token table: pass the texts "
                             "they come from to train_tiny_clip(text_vocab=...)")
        return F.embedding(compact, self.weight)

    @torch.no_grad()
    def write_back(self, full: torch.nn.Embedding) -> None:
        full.weight.mul_(self.decay)
        full.weight[self.ids] = self.weight


def clip_optimizer(params, lr: float, weight_decay: float, temperature: torch.Tensor | None = None,
                   temperature_lr_scale: float = 1.0) -> torch.optim.AdamW:
    """CLIP's AdamW (β = 0.9, 0.98, eps 1e-6), weight decay on matrices only (not on gains, biases
    and the logit scale). Each group's "lr_scale" multiplies the scheduled lr (`train_tiny_clip`): 1,
    except `temperature_lr_scale` for the `temperature` parameter (the learnable logit scale)."""
    params = list(params)
    rest = [p for p in params if p is not temperature]
    groups = [{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay, "lr_scale": 1.0},
              {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0, "lr_scale": 1.0}]
    if temperature is not None and any(p is temperature for p in params):
        groups.append({"params": [temperature], "weight_decay": 0.0, "lr_scale": temperature_lr_scale})
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98), eps=1e-6)


def contrastive_loss(model, img: torch.Tensor, txt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of normalised image embeddings [B, D] against text embeddings [B + H, D]: the
    first B texts are the positives, the H after them extra negatives of image->text only."""
    logits = model.logit_scale.exp() * img @ txt.T                   # [B, B + H]
    target = torch.arange(len(img))
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits[:, :len(img)].T, target)), logits


def train_tiny_clip(records, cfg: dict, out_path, *, steps: int, batch_size: int, lr: float, seed: int,
                    hard_negative_fn: Callable[[str, random.Random], str | None] | None = None,
                    log=print, eval_records=None, weight_decay: float = 0.1,
                    warmup: int | None = None, text_vocab=(), extra_pairs=(), init_state: dict | None = None,
                    temperature_lr_scale: float = 1.0, scenes=None, eval_scenes=None) -> dict:
    """Contrastive training of a tiny CLIP on (image, one random caption of its refs) pairs: the
    `records` (the demo's train split) and `extra_pairs` ((PIL image, captions) kept in memory:
    `dico.demo.pretraining_pairs`), from random weights or from `init_state` (the state dict of a
    trained stand-in: PAC-S is CLIP fine-tuned, so `pac` starts from `clip`). `scenes` / `eval_scenes`:
    the `dico.demo.Scene`s of `records` / `eval_records`, for `retrieval` by truth (None: by text).

    Loss: symmetric InfoNCE with a learnable temperature (CLIP):
        L = ½·CE(s·I Tᵀ, diag) + ½·CE(s·T Iᵀ, diag),  s = exp(logit_scale) ≤ 100.
    With `hard_negative_fn`, each image also gets one perturbed caption whose embedding is an extra
    NEGATIVE column of the image->text softmax ([B, B + H] logits); text->image stays [B, B]. This
    teaches the tiny model details (colours, relations), standing in for PAC-S's stronger training.
    AdamW (β = 0.9, 0.98, CLIP's), linear warmup then cosine decay to lr/10, the logit scale at
    `temperature_lr_scale` times that lr (CLIP's recipe is 1: over its 32 epochs the temperature
    reaches the clamp; in a thousand steps at lr 1e-3 AdamW moves log s by ~0.5, from 14.3 to ~24,
    and the softmax stays soft). Deterministic given seed.
    The token table trains as a `CompactTokenTable` of the ids in the captions and in `text_vocab`
    (texts `hard_negative_fn` may write words of), and the text tower on caption prefixes
    (`encode_text_prefix`, in `TEXT_BUCKETS` length groups): the same model as the plain dense loop,
    at a fraction of its cost.
    """
    from tqdm import tqdm

    from .data import load_image

    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_tiny_clip(cfg, seed).train()
    if init_state is not None:
        model.load_state_dict(init_state)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]

    # decode every image once: some thousand tiny images fit in memory many times over
    images = preprocess_all([load_image(r.path, "train") for r in records] + [im for im, _ in extra_pairs], size)
    captions = [list(r.captions) for r in records] + [list(c) for _, c in extra_pairs]
    caption_tokens = [tokenize(c, ctx) for c in captions]
    n = len(captions)
    bsz = min(batch_size, n)

    vocab = [t.flatten() for t in caption_tokens] + ([tokenize(list(text_vocab), ctx).flatten()] if text_vocab else [])
    table = CompactTokenTable(model.token_embedding, torch.cat(vocab))
    opt = clip_optimizer([p for p in model.parameters() if p is not model.token_embedding.weight] + [table.weight],
                         lr, weight_decay, temperature=model.logit_scale, temperature_lr_scale=temperature_lr_scale)
    warmup = max(1, steps // 10) if warmup is None else warmup

    def lr_at(step):  # linear warmup, then cosine from lr to lr/10
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))

    order: list[int] = []
    losses, first_loss, acc = [], None, 0.0
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not sys.stderr.isatty())
    for step in bar:
        if len(order) < bsz:  # a fresh shuffled pass over the images
            order += rng.sample(range(n), n)
        idx, order = order[:bsz], order[bsz:]
        picks = [rng.randrange(len(captions[i])) for i in idx]
        tokens = torch.stack([caption_tokens[i][j] for i, j in zip(idx, picks)])
        if hard_negative_fn is not None:
            negs = [hard_negative_fn(captions[i][j], rng) for i, j in zip(idx, picks)]
            negs = [t for t in negs if t]
            if negs:
                tokens = torch.cat([tokens, tokenize(negs, ctx)])
        img = F.normalize(model.encode_image(images[idx]), dim=-1)
        txt = F.normalize(encode_text_prefix(model, tokens, table, TEXT_BUCKETS), dim=-1)
        loss, logits = contrastive_loss(model, img, txt)   # negatives only add columns
        scale = model.logit_scale.detach().exp()  # for the log: the temperature this step used

        for g in opt.param_groups:
            g["lr"] = lr_at(step) * g["lr_scale"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        table.decay *= 1 - lr_at(step) * weight_decay
        with torch.no_grad():  # CLIP clamps the temperature at 100
            model.logit_scale.clamp_(0, math.log(100))

        losses.append(loss.item())
        first_loss = losses[0] if first_loss is None else first_loss
        # in-batch i->t accuracy; a column with the same token ids as the positive counts as a hit
        # (generated captions repeat, so two images of a batch may share the positive text)
        acc = (tokens[logits.argmax(1)] == tokens[:len(idx)]).all(1).float().mean().item()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{acc:.2f}")
        if step % 50 == 0 or step == steps - 1:
            log(f"tiny CLIP step {step + 1}/{steps}: loss {losses[-1]:.4f}, in-batch i->t acc {acc:.3f}, "
                f"lr {lr_at(step):.2e}, logit scale {scale.item():.1f}")

    table.write_back(model.token_embedding)
    train_s = time.time() - t0
    save_evaluator(model, out_path)
    ev = Evaluator(model)
    stats = {"steps": steps, "temperature_lr_scale": temperature_lr_scale, "n_images": n, "n_pretraining_images": len(extra_pairs), "batch_size": bsz, "first_loss": first_loss,
             "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
             "final_batch_acc": acc, "logit_scale": model.logit_scale.exp().item(),
             "train": retrieval(ev, images[:512], captions[:512], _first(scenes, min(512, n))),
             "n_params": sum(p.numel() for p in model.parameters()),
             "seconds": round(train_s, 2), "steps_per_s": round(steps / max(train_s, 1e-9), 3)}
    if eval_records:
        eval_images = preprocess_all([load_image(r.path, "val") for r in eval_records], size)
        eval_captions = [list(r.captions) for r in eval_records]
        stats["val"] = retrieval(ev, eval_images, eval_captions, eval_scenes)
        stats["swap_test"] = swap_test(ev, eval_images, eval_captions)
    log(f"tiny CLIP done: {stats}")
    return stats


def _first(scenes, k: int):
    """The first k scenes, or None when there are fewer (the rest of the images are in-memory pairs)."""
    return scenes[:k] if scenes is not None and len(scenes) >= k else None


def retrieval(ev: Evaluator, pixels: torch.Tensor, captions: list[list[str]], scenes=None) -> dict:
    """R@1 both ways over a set's images and all their captions: i2t_r1 = share of images whose top
    caption is true of them, t2i_r1 = share of captions whose top image they are true of.

    Generated data repeats itself: two val scenes may each hold one big red circle, on white and on
    grey, and "there is a big red circle" is then true of both. With the images' `scenes`
    (`dico.demo.Scene`), a hit is a caption the scene makes true (`dico.demo.describes`); without,
    one of the image's own caption texts (then a caption true of another image counts as a miss unless
    that image's references hold the same text). Both are returned: "i2t_r1" / "t2i_r1" by truth
    when scenes are given, "i2t_r1_refs" / "t2i_r1_refs" by reference text always."""
    from .demo import describes

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
    from .cider import simple_tokenize
    from .demo import swapped

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

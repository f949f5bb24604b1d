"""The demo's CLIP stand-ins: tiny open_clip models trained on the demo data (`dico train-clip`).

They play every CLIP role of the paper's pipeline in the demo (frozen backbone, reward model, CLIP-S
and PAC-S scorer; "pac" is trained with hard negatives, the stand-in for PAC-S's stronger training).
They are saved in the PAC-S checkpoint layout and loaded back through `dico.clip_weights.load_evaluator`,
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

from ..clip_model import CLIP_MEAN, CLIP_STD, HEAD_WIDTH, Evaluator, clip_preprocess, encode_text_prefix, tokenize
from ..clip_weights import save_evaluator
from ..images import load_image
from .retrieval import retrieval, swap_test

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
    t0 = time.time()
    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = build_tiny_clip(cfg, seed).train()
    if init_state is not None:
        model.load_state_dict(init_state)
    size, ctx = cfg["vision_cfg"]["image_size"], cfg["text_cfg"]["context_length"]
    data = _Pairs(records, extra_pairs, size, ctx)
    vocab = [t.flatten() for t in data.tokens] + ([tokenize(list(text_vocab), ctx).flatten()] if text_vocab else [])
    table = CompactTokenTable(model.token_embedding, torch.cat(vocab))
    opt = clip_optimizer([p for p in model.parameters() if p is not model.token_embedding.weight] + [table.weight],
                         lr, weight_decay, temperature=model.logit_scale, temperature_lr_scale=temperature_lr_scale)
    lr_at = warmup_cosine(lr, steps, max(1, steps // 10) if warmup is None else warmup)
    losses, acc = _train_steps(model, table, opt, data, rng, steps, min(batch_size, len(data.captions)), lr_at,
                               weight_decay, hard_negative_fn, log)
    table.write_back(model.token_embedding)
    train_s = time.time() - t0
    save_evaluator(model, out_path)
    n = len(data.captions)
    stats = {"steps": steps, "temperature_lr_scale": temperature_lr_scale, "n_images": n,
             "n_pretraining_images": len(extra_pairs), "batch_size": min(batch_size, n),
             "first_loss": losses[0] if losses else None,
             "final_loss": sum(losses[-10:]) / len(losses[-10:]) if losses else None,
             "final_batch_acc": acc, "logit_scale": model.logit_scale.exp().item(),
             **_what_it_sees(Evaluator(model), data, eval_records, scenes, eval_scenes),
             "n_params": sum(p.numel() for p in model.parameters()),
             "seconds": round(train_s, 2), "steps_per_s": round(steps / max(train_s, 1e-9), 3)}
    stats.update(stats.pop("_eval", {}))
    log(f"tiny CLIP done: {stats}")
    return stats


def _what_it_sees(ev: Evaluator, data, eval_records, scenes, eval_scenes) -> dict:
    """Retrieval R@1 over up to 512 train images ("train") and, under "_eval", over `eval_records`
    (the val split) with the swap test."""
    n = len(data.captions)
    out = {"train": retrieval(ev, data.images[:512], data.captions[:512], _first(scenes, min(512, n)))}
    if eval_records:
        eval_images = preprocess_all([load_image(r.path, "val") for r in eval_records], ev.image_size)
        eval_captions = [list(r.captions) for r in eval_records]
        out["_eval"] = {"val": retrieval(ev, eval_images, eval_captions, eval_scenes),
                        "swap_test": swap_test(ev, eval_images, eval_captions)}
    return out


class _Pairs:
    """Every training image decoded and preprocessed once (some thousand tiny images fit in memory many
    times over), with its captions and their CLIP token ids."""

    def __init__(self, records, extra_pairs, size: int, ctx: int):
        self.images = preprocess_all([load_image(r.path, "train") for r in records]
                                     + [im for im, _ in extra_pairs], size)
        self.captions = [list(r.captions) for r in records] + [list(c) for _, c in extra_pairs]
        self.tokens = [tokenize(c, ctx) for c in self.captions]
        self.ctx = ctx


def warmup_cosine(lr: float, steps: int, warmup: int):
    """The learning rate at each step: linear warm-up over `warmup` steps, then cosine from lr to lr/10."""
    def lr_at(step):
        if step < warmup:
            return lr * (step + 1) / warmup
        p = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)))
    return lr_at


def _train_steps(model, table, opt, data: _Pairs, rng: random.Random, steps: int, bsz: int, lr_at,
                 weight_decay: float, hard_negative_fn, log) -> tuple[list[float], float]:
    """The optimisation loop; returns the loss of every step and the last step's in-batch i->t accuracy."""
    from tqdm import tqdm

    order: list[int] = []
    losses, acc = [], 0.0
    n = len(data.captions)
    bar = tqdm(range(steps), desc="tiny CLIP", disable=not sys.stderr.isatty())
    for step in bar:
        if len(order) < bsz:  # a fresh shuffled pass over the images
            order += rng.sample(range(n), n)
        idx, order = order[:bsz], order[bsz:]
        tokens = _batch_tokens(data, idx, rng, hard_negative_fn)
        img = F.normalize(model.encode_image(data.images[idx]), dim=-1)
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
        # in-batch i->t accuracy; a column with the same token ids as the positive counts as a hit
        # (generated captions repeat, so two images of a batch may share the positive text)
        acc = (tokens[logits.argmax(1)] == tokens[:len(idx)]).all(1).float().mean().item()
        bar.set_postfix(loss=f"{losses[-1]:.3f}", acc=f"{acc:.2f}")
        if step % 50 == 0 or step == steps - 1:
            log(f"tiny CLIP step {step + 1}/{steps}: loss {losses[-1]:.4f}, in-batch i->t acc {acc:.3f}, "
                f"lr {lr_at(step):.2e}, logit scale {scale.item():.1f}")
    return losses, acc


def _batch_tokens(data: _Pairs, idx: list[int], rng: random.Random, hard_negative_fn) -> torch.Tensor:
    """One random caption per image of the batch, then (with `hard_negative_fn`) one perturbed
    caption per image after them, as extra negatives."""
    picks = [rng.randrange(len(data.captions[i])) for i in idx]
    tokens = torch.stack([data.tokens[i][j] for i, j in zip(idx, picks)])
    if hard_negative_fn is not None:
        negs = [hard_negative_fn(data.captions[i][j], rng) for i, j in zip(idx, picks)]
        negs = [t for t in negs if t]
        if negs:
            tokens = torch.cat([tokens, tokenize(negs, data.ctx)])
    return tokens


def _first(scenes, k: int):
    """The first k scenes, or None when there are fewer (the rest of the images are in-memory pairs)."""
    return scenes[:k] if scenes is not None and len(scenes) >= k else None



def train_standin(spec: dict, splits_json, out, *, init: str | None = None, stats_out=None, workers: int = 1,
                  log=print) -> dict:
    """`dico train-clip`: train the clip_models entry `spec` (source demo) on the demo's train split and
    `train.pretraining_scenes` scenes drawn in memory, from random weights or from the checkpoint
    `init` of the entry `train.init` names (read back through the loader of the real checkpoints),
    save it to `out` and its retrieval figures to `stats_out`."""
    from ..clip_weights import load_evaluator
    from ..data import load_split
    from ..io import write_json
    from .dataset import pretraining_pairs, split_scenes
    from .negatives import hard_negative_words, perturb_caption

    t = spec["train"]
    cfg = tiny_clip_config(embed_dim=t["embed_dim"], image_size=spec["image_size"], patch_size=t["patch_size"],
                           vision_width=t["vision_width"], vision_layers=t["vision_layers"],
                           text_width=t["text_width"], text_layers=t["text_layers"],
                           context_length=t["context_length"])
    init_state = None
    if t["init"]:
        if not init:
            raise SystemExit(f"clip_models.{spec['name']}.train.init is {t['init']!r}: give its checkpoint with --init")
        init_state = load_evaluator(init, format="openai").model.state_dict()
        log(f"starting from {init} (clip_models.{spec['name']}.train.init: {t['init']})")
    extra = pretraining_pairs(t["pretraining_scenes"], spec["image_size"], seed=t["seed"], workers=workers)
    stats = train_tiny_clip(load_split(splits_json, "train"), cfg, out, steps=t["steps"],
                            batch_size=t["batch_size"], lr=t["lr"], seed=t["seed"],
                            hard_negative_fn=perturb_caption if t["hard_negatives"] else None, log=log,
                            eval_records=load_split(splits_json, "val"),
                            text_vocab=hard_negative_words() if t["hard_negatives"] else (),
                            extra_pairs=extra, init_state=init_state, temperature_lr_scale=t["temperature_lr_scale"],
                            scenes=split_scenes(splits_json, "train"), eval_scenes=split_scenes(splits_json, "val"))
    if stats_out:  # retrieval R@1 on val (and on up to 512 train images), the training figures
        write_json(stats_out, {"name": spec["name"], "init": t["init"], **stats, "config": cfg})
    v = stats["val"]
    log(f"demo CLIP model {spec['name']} written to {out}: val R@1 i->t {v['i2t_r1']:.3f}, t->i {v['t2i_r1']:.3f} "
        f"(hits: {v['hits']}; by reference text {v['i2t_r1_refs']:.3f}, {v['t2i_r1_refs']:.3f})")
    return stats

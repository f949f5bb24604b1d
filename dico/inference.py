"""Captioning with a trained captioner: beam search over cached grid features, batched, and the
pipeline's `generate` step (one or more checkpoints x one or more splits -> COCO-format captions files).
"""
from __future__ import annotations

import time

import torch

from . import runtime
from .checkpoint import check_backbone, load_captioner
from .data import load_split
from .decoding import beam_search
from .features import FeatureStore, aligned_store
from .io import Outputs
from .model import Captioner
from .text import postprocess
from .tokenizer import CaptionTokenizer


def decode_beams(model: Captioner, memory, decoding: dict):
    """Beam search with the config's decoding settings (style, beams, length, length penalty)."""
    return beam_search(model, memory, beam_size=decoding["beam_size"], max_len=decoding["max_len"],
                       style=decoding["style"], length_penalty=decoding["length_penalty"])


@torch.no_grad()
def generate_captions(model: Captioner, tok: CaptionTokenizer, store: FeatureStore, indices, *,
                      beam_size: int, max_len: int, batch_size: int, device: str, amp: str = "none",
                      style: str = "hf", length_penalty: float = 1.0, progress: bool = False) -> list[str]:
    """The best beam of each image, decoded (eval mode: test decoding never uses dropout)."""
    from tqdm import tqdm

    decoding = {"beam_size": beam_size, "max_len": max_len, "style": style, "length_penalty": length_penalty}
    indices = list(indices)
    was_training = model.training
    model.eval()
    out = []
    batches = range(0, len(indices), batch_size)
    for lo in tqdm(batches, desc="beam search", unit="batch", disable=not progress, mininterval=2.0):
        out += caption_batch(model, tok, store[indices[lo:lo + batch_size]], decoding, amp, device)
    model.train(was_training)
    return out


@torch.no_grad()
def caption_batch(model: Captioner, tok: CaptionTokenizer, feats: torch.Tensor, decoding: dict, amp: str,
                  device: str) -> list[str]:
    """The best beam of each row of the float32 grid features `feats` [B, T, D], decoded (the model in
    eval mode: `generate_captions` and `dico caption` both run this)."""
    with runtime.autocast(device, amp):
        tokens, _ = decode_beams(model, model.encode(feats.to(device)), decoding)
    return tok.decode_batch(tokens[:, 0])


def caption_splits(jobs: list[dict], splits_json, decoding: dict, amp: str, device: str, log=print) -> None:
    """The `generate` step: for each job ({"model": checkpoint, "split", "features": index.json, "out"}),
    the best beam of every image of the split, post-processed as `decoding.postprocess` says
    (official: what the official save_predictions writes, `dico.text`), written as a COCO results list:
    every file or none (dico.io.Outputs). Consecutive jobs of one checkpoint load it once; a split's
    features load once for all checkpoints."""
    stores, loaded = {}, (None, None)
    with Outputs() as out:
        for job in jobs:
            if loaded[0] != job["model"]:
                loaded = (job["model"], load_captioner(job["model"], device))
            records = load_split(splits_json, job["split"])
            if job["split"] not in stores:
                stores[job["split"]] = aligned_store(job["features"], records, job["split"])
            t0 = time.time()
            caps, final = _caption(*loaded[1], stores[job["split"]], records, job["model"], decoding, amp, device)
            out.write_json(job["out"], [{"image_id": r.image_id, "caption": c} for r, c in zip(records, final)])
            log(f"{job['model']} {job['split']}: {len(caps)} captions in {time.time() - t0:.1f}s -> {job['out']} "
                f"(e.g. {final[0]!r}, decoded {caps[0]!r}, postprocess {decoding['postprocess']})")


def _caption(model, tok, payload, store, records, path, decoding: dict, amp: str, device: str):
    """(decoded, post-processed) captions of every record by the checkpoint at `path`."""
    check_backbone(payload, store.grid, path)
    caps = generate_captions(model, tok, store, range(len(records)), beam_size=decoding["beam_size"],
                             max_len=decoding["max_len"], batch_size=decoding["batch_size"], device=device,
                             amp=amp, style=decoding["style"], length_penalty=decoding["length_penalty"],
                             progress=True)
    return caps, postprocess(caps, decoding["postprocess"], decoding.get("nltk_data"))

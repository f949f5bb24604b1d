"""Validation during training: caption the first val images and score them, every `val_every` steps.

CIDEr-D for XE (the official selection metric), and for fine-tuning CLIP-S / RefCLIP-S / PAC-S /
RefPAC-S in the form `selection.form` names (the official trainer's, by default); the caller may
add a fluency measure (the demo's grammar).
"""
from __future__ import annotations

import torch

from .data import ImageRecord
from .features import FeatureStore, usable_rows
from .inference import generate_captions
from .metrics.cider import cider_d, simple_tokenize
from .metrics.clipscore import reference_embeddings, score_captions, score_captions_validation_form
from .metrics.diversity import fluent_pct
from .text import postprocess


class Validator:
    """Captions the first `val_images` val images and scores them: CIDEr-D (our exact
    implementation, equal to pycocoevalcap's, over the whitespace tokens of the post-processed
    captions and references, as the official validation; `evaluate` uses the Java PTB tokenizer),
    and for fine-tuning CLIP-S / RefCLIP-S / PAC-S / RefPAC-S in the form `selection.form` names:

    - "validation" (default, the official trainer's checkpoint selection: official utils.py
      `clip_score_from_predictions` -> `compute_clip_score(ref=True)`): no text prefix, the candidate
      cosine NOT clamped, the best reference cosine clamped at 0: s = w*cos(I, c),
      t = max(max_r cos(c, r), 0), Ref = 2st/(s+t);
    - "metric": the reported metrics' form (evaluate.clip_s / evaluate.pac_s: prefix
      "A photo depicts ", s = w*max(cos, 0), t unclamped), as `evaluate` computes them.
    """

    def __init__(self, store: FeatureStore, records: list[ImageRecord], spec: dict, device: str,
                 scorers: dict | None = None, grammar=None):
        n = spec["train"]["val_images"] or len(records)
        self.indices = usable_rows(store, records[:n])  # skipped (unreadable) images are not scored
        self.store, self.spec, self.device = store, spec, device
        self.records = [records[i] for i in self.indices]
        self.gts = None  # CIDEr references, tokenised at the first call (they need the tokenizer)
        self.scorers = scorers or {}  # metric name -> (evaluator, image_embs [N,D], w, prefix)
        self.ref_embs: dict[str, torch.Tensor] = {}  # metric name -> its embedded references (fixed: once)
        self.grammar = grammar  # a predicate text -> bool (the demo's grammar): fluent_pct in the curves

    def _cider_tokens(self, texts: list[str]) -> list[str]:
        """What the official validation CIDEr splits on whitespace (official utils.py compute_metrics):
        the post-processed text (dico.text) under decoding.postprocess official, else a light
        tokenizer."""
        mode = self.spec["decoding"]["postprocess"]
        if mode == "none":
            return [simple_tokenize(c) for c in texts]
        return postprocess(texts, mode, self.spec["decoding"].get("nltk_data"))

    def __call__(self, model, tok) -> dict:
        dec = self.spec["decoding"]
        if self.gts is None:  # the official references went through the tokenizer and back (77 tokens max)
            refs = [[tok.decode(tok.encode(c, self.spec["model"]["max_caption_tokens"])) for c in r.captions]
                    for r in self.records]
            self.gts = {i: self._cider_tokens(rs) for i, rs in enumerate(refs)}
        caps = generate_captions(model, tok, self.store, self.indices, beam_size=dec["beam_size"],
                                 max_len=dec["max_len"], batch_size=dec["batch_size"], device=self.device,
                                 amp=self.spec["train"]["amp"], style=dec["style"],
                                 length_penalty=dec["length_penalty"])
        cider, _ = cider_d(self.gts, {i: [t] for i, t in enumerate(self._cider_tokens(caps))})
        metrics = {"CIDEr": cider}
        form = self.spec.get("selection", {}).get("form", "metric")
        refs = [list(r.captions) for r in self.records]
        for name, (evaluator, embs, w, prefix) in self.scorers.items():
            if name not in self.ref_embs:
                self.ref_embs[name] = reference_embeddings(evaluator, refs, "" if form == "validation" else prefix)
            if form == "validation":
                s = score_captions_validation_form(evaluator, embs[self.indices], caps, refs, w=w,
                                                   ref_embs=self.ref_embs[name])
            else:
                s = score_captions(evaluator, embs[self.indices], caps, refs, w=w, prefix=prefix,
                                   ref_embs=self.ref_embs[name])
            metrics[name], metrics[f"Ref{name}"] = s["score"], s["ref_score"]
        if self.grammar is not None:
            metrics["fluent_pct"] = fluent_pct(caps, self.grammar)
        metrics["example"] = caps[0]
        return metrics

"""Every metric of the paper's tables over aligned captions: the one scoring core that `dico evaluate`
(a run's captions, with cached image embeddings) and `dico score` (anyone's captions) both call.

COCO suite through pycocoevalcap's PTB tokenizer and scorers (`dico.metrics.coco`), CLIP-S / PAC-S
and their Ref- variants with the official definitions (`dico.metrics.clipscore`). A metric that
cannot run gets a reason instead of a value, never a silent 0.
"""
from __future__ import annotations

import shutil

from .clipscore import score_captions
from .coco import JAVA_MISSING, coco_scores
from .keys import CLIP_FAMILY, COCO_SUITE, METRICS


def compute(captions: list[str], refs: list[list[str]], wanted: list[str] | None = None, clip: dict | None = None,
            spice_jar_dir=None, meteor: bool = True, spice_cache=None) -> tuple[dict, dict, dict]:
    """(corpus, per_entry, reasons) over aligned lists of candidates and their references.

    `wanted`: names of `keys.METRICS` (None: all). `clip` maps "clip-s" / "pac-s" to
    (evaluator, image embeddings aligned with `captions`, {"w", "prefix"}), or to the reason there is
    none. `meteor=False`: METEOR "disabled in config". `spice_cache`: SPICE's parse cache folder. Every wanted metric that cannot run gets a
    reason; metrics not wanted get "not requested (--metrics)"."""
    chosen = list(METRICS) if wanted is None else wanted
    corpus, per, reasons = {}, {}, {}
    if "meteor" in chosen and not meteor:
        reasons["METEOR"] = "disabled in config"
    coco = [m for m in COCO_SUITE if m in chosen and (m != "meteor" or meteor)]
    if coco:
        if shutil.which("java") is None:
            for m in coco:
                for k in METRICS[m]:
                    reasons[k] = "not computed: " + JAVA_MISSING
        else:
            c, p, notes = coco_scores(dict(enumerate(refs)), dict(enumerate(captions)), coco, spice_jar_dir,
                                      spice_cache)
            corpus.update(c)
            per.update(p)
            reasons.update(notes)  # "skipped: ..." / "failed: ..."
    for name, key in CLIP_FAMILY.items():
        want = [m for m in (name, "ref" + name) if m in chosen]
        if not want:
            continue
        scorer = (clip or {}).get(name, "no model given")
        if isinstance(scorer, str):
            for m in want:
                reasons[METRICS[m][0]] = f"not computed: {scorer}"
            continue
        evaluator, image_embs, settings = scorer
        s = score_captions(evaluator, image_embs, captions, refs, w=settings["w"], prefix=settings["prefix"],
                           batch_size=256)
        for m in want:
            part = "score" if m == name else "ref_score"
            corpus[METRICS[m][0]], per[METRICS[m][0]] = s[part], s[part + "_per_caption"]
    for m in METRICS:
        for k in METRICS[m]:
            if k not in corpus and k not in reasons:
                reasons[k] = "not requested (--metrics)" if m not in chosen else "not computed"
    return corpus, per, reasons

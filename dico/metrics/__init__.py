"""The one evaluation stack, serving both `dico evaluate` (the pipeline's step) and `dico score`
(anyone's captions).

    keys          the metric names and the keys of a metrics JSON, in one place
    inputs        readers of candidates and references in every accepted layout; the image folder
    coco          BLEU, METEOR, ROUGE-L, CIDEr-D, SPICE via the Java PTB tokenizer, with per-image values
    spice         SPICE 1.0 run with the flags Java 9+ needs (Java 15+: through SpiceRun.java, no Nashorn)
    cider         our exact, vectorised CIDEr-D (equal to pycocoevalcap's)
    clipscore     CLIP-S / PAC-S and their Ref- variants (official definitions), reward and validation forms
    diversity     vocabulary, novelty, length, distinct n-grams, repetitions, fluency
    scoring       every metric over aligned captions: the core both commands call
    run_metrics   the pipeline's metrics JSON of a run on a split (`dico evaluate`)
    score_files   anyone's caption files (`dico score`)
    correlation   Kendall tau against human judgements (`dico score --correlation`)

`dico.metrics.cider_d` and `dico.metrics.clip_scores` are importable from here as well (loaded on first
use, so that importing a light part of the stack does not import torch).
"""
_EXPORTS = {"cider_d": "cider", "clip_scores": "clipscore"}


def __getattr__(name):
    if name in _EXPORTS:
        from importlib import import_module

        return getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

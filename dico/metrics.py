"""Caption metrics: the COCO suite (pycocoevalcap scorers, called one by one) and diversity/fluency statistics.

Why not `COCOEvalCap.evaluate()`: it instantiates SPICE first, which downloads Stanford CoreNLP 3.6.0 and dies
offline before computing anything. We tokenise with the Java PTB tokenizer and call BLEU, METEOR, ROUGE-L,
CIDEr-D (our exact vectorised `dico.cider.cider_d`) and SPICE ourselves; a metric that cannot run is None with
the reason in `notes`, never a silent 0. Values are raw pycocoevalcap numbers (CIDEr ~1.2, not 120).

CLIP-S / PAC-S live in their own module.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable

import numpy as np

from dico.cider import cider_d, simple_tokenize

METRIC_KEYS = ("BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr", "SPICE")
SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
JAVA_MISSING = ("Java not found on PATH: the PTB tokenizer and METEOR need a Java runtime; install openjdk "
                "(apt-get install default-jre-headless, or the eval conda env which carries openjdk)")


def require_java() -> None:
    if shutil.which("java") is None:
        raise RuntimeError(JAVA_MISSING)


_PTB_KNOWN: dict[str, str] = {}  # raw caption -> its PTB tokens, filled by ptb_prefetch


def ptb_prefetch(texts) -> None:
    """Tokenise `texts` in one PTBTokenizer call and remember each result, so that a later
    `ptb_tokenize` of known captions only starts no JVM (`dico evaluate` of many runs and splits:
    one JVM instead of one per run and split). Exact: the tokenizer reads one caption per line
    (-preserveLines), so a caption's tokens do not depend on the captions around it."""
    todo = sorted(set(texts) - _PTB_KNOWN.keys())
    if todo:
        out = _ptb_tokenize({i: [t] for i, t in enumerate(todo)})
        _PTB_KNOWN.update({t: out[i][0] for i, t in enumerate(todo)})


def ptb_tokenize(captions: dict) -> dict:
    """{id: [str, ...]} -> {id: [tokenized str, ...]} with pycocoevalcap's PTBTokenizer (Stanford CoreNLP 3.4.1,
    Java): lower-cased, punctuation tokens removed. One JVM start (~0.5 s) per call, none when every
    caption was tokenised by `ptb_prefetch`."""
    if _PTB_KNOWN and all(c in _PTB_KNOWN for caps in captions.values() for c in caps):
        return {i: [_PTB_KNOWN[c] for c in caps] for i, caps in captions.items()}
    return _ptb_tokenize(captions)


def _ptb_tokenize(captions: dict) -> dict:
    require_java()
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    out = PTBTokenizer().tokenize({i: [{"caption": c} for c in caps] for i, caps in captions.items()})
    for i, caps in captions.items():  # it pairs output lines with inputs by position: check nothing shifted
        if len(out.get(i, [])) != len(caps):
            raise RuntimeError(f"PTBTokenizer returned {len(out.get(i, []))} captions for id {i!r}, expected {len(caps)}")
    return out


# ----------------------------------------------------------------------------------------------
# SPICE availability

def _spice_lib() -> Path:
    import pycocoevalcap.spice as spice

    return Path(spice.__path__[0]) / "lib"


def _spice_dirs(spice_jar_dir) -> list[Path]:
    return ([Path(spice_jar_dir)] if spice_jar_dir else []) + [_spice_lib()]


def find_spice_jars(spice_jar_dir: str | os.PathLike | None = None) -> Path | None:
    """The first of (spice_jar_dir, pycocoevalcap's spice/lib) that holds both CoreNLP 3.6.0 jars, else None."""
    return next((d for d in _spice_dirs(spice_jar_dir) if all((d / j).is_file() for j in SPICE_JARS)), None)


SPICE_MISSING = "not computed (Stanford CoreNLP 3.6.0 jars missing)"


def _spice_missing_reason(spice_jar_dir) -> str:
    """What a table prints (before the first "; ": `dico.report.table_reason`), then where we looked and
    the fix, for the log and the metrics JSON."""
    where = " or ".join(map(str, _spice_dirs(spice_jar_dir)))
    return (f"{SPICE_MISSING}; looked for {', '.join(SPICE_JARS)} in {where}; put them in a folder and set "
            "evaluate.spice_jar_dir (dico score: --spice-jar-dir)")


def _install_spice_jars(src: Path) -> None:
    """spice-1.0.jar's manifest loads the CoreNLP jars from its own lib/ folder: link (or copy) them there."""
    lib = _spice_lib()
    for jar in SPICE_JARS:
        if not (lib / jar).exists():
            try:
                os.symlink((src / jar).resolve(), lib / jar)
            except OSError:
                shutil.copy2(src / jar, lib / jar)


def _spice(gts: dict, res: dict, spice_jar_dir, notes: dict) -> float | None:
    jars = find_spice_jars(spice_jar_dir)
    if jars is None:
        notes["SPICE"] = _spice_missing_reason(spice_jar_dir)
        return None
    try:
        _install_spice_jars(jars)
        from pycocoevalcap.spice.spice import Spice

        return float(Spice().compute_score(gts, res)[0])
    except Exception as e:  # e.g. Java >= 9 InaccessibleObjectException in its LMDB cache, -Xmx8G refused
        notes["SPICE"] = f"failed: {type(e).__name__}: {e}"
        return None


# ----------------------------------------------------------------------------------------------
# the COCO suite

_METEOR = None


def _meteor_scorer():
    """One METEOR JVM per process: starting it (loading the paraphrase tables) costs ~12 s, scoring
    a split well under a second, so scoring several splits in one process shares the start-up."""
    global _METEOR
    if _METEOR is None:
        from pycocoevalcap.meteor.meteor import Meteor

        _METEOR = Meteor()
    return _METEOR


def start_meteor() -> None:
    """Start the METEOR JVM now (Meteor() spawns it and returns), so that its ~7 s of loading overlap
    the caller's own start-up; a failure here is left to the first score, which records it."""
    try:
        _meteor_scorer()
    except Exception:  # no java: _meteor() retries and writes the reason into the metrics
        pass


def _meteor(gts: dict, res: dict, enabled: bool, notes: dict) -> float | None:
    global _METEOR
    if not enabled:
        notes["METEOR"] = "disabled in config"
        return None
    try:
        return float(_meteor_scorer().compute_score(gts, res)[0])
    except Exception as e:  # BrokenPipeError: the JVM died (too little memory for -Xmx2G, no java)
        _METEOR = None
        notes["METEOR"] = f"failed: {type(e).__name__}: {e}"
        return None


def coco_metrics(refs: dict, cands: dict, meteor: bool = True,
                 spice_jar_dir: str | None = None) -> tuple[dict, dict]:
    """refs {id: [raw str, ...]}, cands {id: raw str}. PTB-tokenise both, then BLEU-1..4, METEOR, ROUGE-L,
    CIDEr(-D) and SPICE one by one. Returns (metrics, notes): metrics has exactly METRIC_KEYS with raw
    pycocoevalcap values; a metric that cannot run is None and notes[key] says why. METEOR costs ~15 s of JVM
    start and paraphrase-table loading, hence the flag."""
    require_java()
    if refs.keys() != cands.keys():
        raise ValueError("refs and cands must have the same ids")
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.rouge.rouge import Rouge

    gts, res = ptb_tokenize_pairs(refs, cands)  # one JVM start for both
    metrics, notes = {}, {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    metrics.update({f"BLEU-{n}": float(b) for n, b in enumerate(bleu, 1)})
    metrics["METEOR"] = _meteor(gts, res, meteor, notes)
    metrics["ROUGE-L"] = float(Rouge().compute_score(gts, res)[0])
    metrics["CIDEr"] = cider_d(gts, res)[0]
    metrics["SPICE"] = _spice(gts, res, spice_jar_dir, notes)
    return {k: metrics[k] for k in METRIC_KEYS}, notes


# ----------------------------------------------------------------------------------------------
# diversity and fluency

def _has_repeat(words: list[str]) -> bool:
    """A degenerate repetition: the same word twice in a row ("a a"), or a word trigram occurring
    twice ("on the table on the table"). Trigrams, not bigrams: listing objects repeats bigrams
    naturally ("a large red circle and a large blue box")."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


NO_GRAMMAR = "only the demo knows the grammar of its captions (fluent_pct is a demo measure)"


def fluent_pct(texts: list[str], grammar) -> float:
    """% of `texts` that `grammar` (the demo's `dico.demo.grammatical`) accepts."""
    return 100.0 * sum(map(grammar, texts)) / len(texts)


def diversity(cands: dict | list, train_captions: Iterable[str], grammar=None) -> dict:
    """Diversity/fluency statistics of generated captions, after `simple_tokenize` (lower-case, no punctuation).

    vocab_size: distinct words over all candidates; novel_pct: % of candidates whose normalised string never
    occurs among the normalised training captions; mean_length: words per candidate; distinct_1 / distinct_2:
    distinct n-grams / n-grams over the whole set; repeat_pct: % of candidates with a repeated word or trigram
    (see `_has_repeat`); fluent_pct: % of candidates `grammar(text)` accepts (the demo's
    `dico.demo.grammatical`), else None with `fluent_pct_reason`. cands: {id: str} (or {id: [str]}) or a
    list of str."""
    texts = list(cands.values()) if isinstance(cands, dict) else list(cands)
    texts = [t[0] if isinstance(t, (list, tuple)) else t for t in texts]
    if not texts:
        raise ValueError("no candidates")
    sents = [simple_tokenize(t) for t in texts]
    words = [s.split() for s in sents]
    train = {simple_tokenize(t) for t in train_captions}
    unigrams = [w for ws in words for w in ws]
    bigrams = [b for ws in words for b in zip(ws, ws[1:])]
    return {
        "vocab_size": len(set(unigrams)),
        "novel_pct": 100.0 * sum(s not in train for s in sents) / len(sents),
        "mean_length": float(np.mean([len(ws) for ws in words])),
        "distinct_1": len(set(unigrams)) / len(unigrams) if unigrams else 0.0,
        "distinct_2": len(set(bigrams)) / len(bigrams) if bigrams else 0.0,
        "repeat_pct": 100.0 * sum(map(_has_repeat, words)) / len(words),
        "fluent_pct": fluent_pct(texts, grammar) if grammar else None,
        **({} if grammar else {"fluent_pct_reason": NO_GRAMMAR}),
    }


# ----------------------------------------------------------------------------------------------
# the COCO suite with per-image values (dico score, human correlation)

COCO_SCORERS = ("bleu", "meteor", "rouge", "cider", "spice")


def ptb_tokenize_pairs(refs: dict, cands: dict) -> tuple[dict, dict]:
    """References {id: [str]} and candidates {id: str} through ONE PTBTokenizer call (one JVM start).
    The tokenizer reads one caption per line (-preserveLines), so tokenising both sets together gives
    the same tokens as two calls (tests/test_score.py checks it against pycocoevalcap)."""
    joint = {("ref", i): list(caps) for i, caps in refs.items()}
    joint.update({("cand", i): [c] for i, c in cands.items()})
    out = ptb_tokenize(joint)
    return {i: out[("ref", i)] for i in refs}, {i: out[("cand", i)] for i in cands}


def _spice_per_image(gts: dict, res: dict, spice_jar_dir, notes: dict) -> tuple[float | None, list | None]:
    jars = find_spice_jars(spice_jar_dir)
    if jars is None:
        notes["SPICE"] = _spice_missing_reason(spice_jar_dir)
        return None, None
    try:
        _install_spice_jars(jars)
        from pycocoevalcap.spice.spice import Spice

        score, per = Spice().compute_score(gts, res)  # per: one dict per image, in sorted-id order
        return float(score), [float(p["All"]["f"]) for p in per]
    except Exception as e:  # see _spice
        notes["SPICE"] = f"failed: {type(e).__name__}: {e}"
        return None, None


def coco_scores(refs: dict, cands: dict, scorers=COCO_SCORERS,
                spice_jar_dir: str | None = None) -> tuple[dict, dict, dict]:
    """refs {id: [raw str, ...]}, cands {id: raw str} -> (corpus, per_image, notes).

    The scorers of `coco_metrics` (pycocoevalcap's BLEU, METEOR, ROUGE-L, SPICE; CIDEr-D =
    dico.cider.cider_d), restricted to `scorers`, with per-image values as well: per_image[key] is a
    list aligned with the order of `cands`. Corpus values are pycocoevalcap's (BLEU and METEOR are
    corpus statistics, not the mean of the per-image values). A metric that cannot run is absent from
    both dicts and notes[key] says why."""
    require_java()
    unknown = set(scorers) - set(COCO_SCORERS)
    if unknown:
        raise ValueError(f"unknown COCO scorers {sorted(unknown)}; choose from {', '.join(COCO_SCORERS)}")
    ids = list(cands)
    gts_by_id, res_by_id = ptb_tokenize_pairs({i: refs[i] for i in ids}, cands)
    # positions as keys: SPICE sorts the ids, which fails for mixed int/str ids
    gts = {n: gts_by_id[i] for n, i in enumerate(ids)}
    res = {n: res_by_id[i] for n, i in enumerate(ids)}
    corpus, per, notes = {}, {}, {}
    if "bleu" in scorers:
        from pycocoevalcap.bleu.bleu import Bleu

        bleu, per_bleu = Bleu(4).compute_score(gts, res, verbose=0)
        for n in range(4):
            corpus[f"BLEU-{n + 1}"] = float(bleu[n])
            per[f"BLEU-{n + 1}"] = [float(x) for x in per_bleu[n]]
    if "meteor" in scorers:
        global _METEOR
        try:
            score, scores = _meteor_scorer().compute_score(gts, res)
            corpus["METEOR"], per["METEOR"] = float(score), [float(x) for x in scores]
        except Exception as e:  # see _meteor
            _METEOR = None
            notes["METEOR"] = f"failed: {type(e).__name__}: {e}"
    if "rouge" in scorers:
        from pycocoevalcap.rouge.rouge import Rouge

        score, scores = Rouge().compute_score(gts, res)
        corpus["ROUGE-L"], per["ROUGE-L"] = float(score), [float(x) for x in scores]
    if "cider" in scorers:
        score, by_pos = cider_d(gts, res)
        corpus["CIDEr"], per["CIDEr"] = float(score), [float(by_pos[n]) for n in range(len(ids))]
    if "spice" in scorers:
        score, scores = _spice_per_image(gts, res, spice_jar_dir, notes)
        if score is not None:
            corpus["SPICE"], per["SPICE"] = score, scores
    return corpus, per, notes

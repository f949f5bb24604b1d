"""The COCO caption metrics: BLEU-1..4, METEOR, ROUGE-L, CIDEr-D and SPICE, with per-image values.

Why not `COCOEvalCap.evaluate()`: it instantiates SPICE first, which downloads Stanford CoreNLP 3.6.0 and dies
offline before computing anything. We tokenise with the Java PTB tokenizer and call pycocoevalcap's BLEU,
METEOR, ROUGE-L and SPICE and our exact vectorised CIDEr-D (`dico.metrics.cider.cider_d`) one by one; a metric
that cannot run is left out with the reason in `notes`, never a silent 0. Values are raw pycocoevalcap numbers
(CIDEr ~1.2, not 120).
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

from .cider import cider_d
from .keys import COCO_SUITE

from .spice import FETCH_HINT, SPICE_JARS, run_spice
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





def ptb_tokenize_pairs(refs: dict, cands: dict) -> tuple[dict, dict]:
    """References {id: [str]} and candidates {id: str} through ONE PTBTokenizer call (one JVM start).
    The tokenizer reads one caption per line (-preserveLines), so tokenising both sets together gives
    the same tokens as two calls (tests/test_score.py checks it against pycocoevalcap)."""
    joint = {("ref", i): list(caps) for i, caps in refs.items()}
    joint.update({("cand", i): [c] for i, c in cands.items()})
    out = ptb_tokenize(joint)
    return {i: out[("ref", i)] for i in refs}, {i: out[("cand", i)] for i in cands}


# ----------------------------------------------------------------------------------------------
# SPICE

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
    """What a table prints (before the first "; ": `dico.report.table.table_reason`), then where we looked and
    the fix, for the log and the metrics JSON."""
    where = " or ".join(map(str, _spice_dirs(spice_jar_dir)))
    return (f"{SPICE_MISSING}; looked for {', '.join(SPICE_JARS)} in {where}; put them in a folder and set "
            f"evaluate.spice_jar_dir (dico score: --spice-jar-dir); {FETCH_HINT}")


def _spice_per_image(gts: dict, res: dict, spice_jar_dir, notes: dict,
                     spice_cache: str | None = None) -> tuple[float | None, list | None]:
    """SPICE through dico.metrics.spice (pycocoevalcap's scorer, run with the flags today's Java needs)."""
    jars = find_spice_jars(spice_jar_dir)
    if jars is None:
        notes["SPICE"] = _spice_missing_reason(spice_jar_dir)
        return None, None
    try:
        return run_spice(gts, res, jars, spice_cache)  # per image in sorted-id order: the positions here
    except Exception as e:  # the reason and its fix (dico.metrics.spice._explain), e.g. -Xmx8G refused
        notes["SPICE"] = f"failed: {type(e).__name__}: {e}"
        return None, None


# ----------------------------------------------------------------------------------------------
# METEOR: one JVM per process

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
    except Exception:  # no java: coco_scores retries and writes the reason into the metrics
        pass


# ----------------------------------------------------------------------------------------------
# the suite

def coco_scores(refs: dict, cands: dict, scorers=COCO_SUITE,
                spice_jar_dir: str | None = None, spice_cache: str | None = None) -> tuple[dict, dict, dict]:
    """refs {id: [raw str, ...]}, cands {id: raw str} -> (corpus, per_image, notes).

    pycocoevalcap's BLEU, METEOR, ROUGE-L and SPICE and our CIDEr-D (`dico.metrics.cider.cider_d`, equal
    to pycocoevalcap's), restricted to `scorers`, with per-image values as well: per_image[key] is a
    list aligned with the order of `cands`. Corpus values are pycocoevalcap's (BLEU and METEOR are
    corpus statistics, not the mean of the per-image values). A metric that cannot run is absent from
    both dicts and notes[key] says why."""
    require_java()
    unknown = set(scorers) - set(COCO_SUITE)
    if unknown:
        raise ValueError(f"unknown COCO scorers {sorted(unknown)}; choose from {', '.join(COCO_SUITE)}")
    ids = list(cands)
    missing = [i for i in ids if i not in refs]
    if missing:
        raise ValueError(f"{len(missing)} candidates have no references (first: {missing[:3]})")
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
        except Exception as e:  # BrokenPipeError: the JVM died (too little memory for -Xmx2G, no java)
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
        score, scores = _spice_per_image(gts, res, spice_jar_dir, notes, spice_cache)
        if score is not None:
            corpus["SPICE"], per["SPICE"] = score, scores
    return corpus, per, notes

"""Diversity and fluency statistics of generated captions: vocabulary, novelty, length, distinct n-grams,
degenerate repetitions and, where the caller gives a grammar (the demo's), the share of fluent captions."""
from __future__ import annotations

from typing import Iterable

import numpy as np

from .cider import simple_tokenize


def _has_repeat(words: list[str]) -> bool:
    """A degenerate repetition: the same word twice in a row ("a a"), or a word trigram occurring
    twice ("on the table on the table"). Trigrams, not bigrams: listing objects repeats bigrams
    naturally ("a large red circle and a large blue box")."""
    if any(a == b for a, b in zip(words, words[1:])):
        return True
    trigrams = list(zip(words, words[1:], words[2:]))
    return len(set(trigrams)) < len(trigrams)


# the metrics JSONs' fluent_pct_reason where no grammar is given (no other data set has a grammar to test)
NO_GRAMMAR = "only the demo knows the grammar of its captions (fluent_pct is a demo measure)"


def fluent_pct(texts: list[str], grammar) -> float:
    """% of `texts` that `grammar` (a predicate text -> bool, e.g. the demo's `dico.demo.grammatical`) accepts."""
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

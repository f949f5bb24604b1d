"""CIDEr-D, vectorised with numpy: the exact numbers of pycocoevalcap's `Cider`, computed for all images at once.

CIDEr-D of a candidate c against the references S = {s_1..s_m} of its image (Vedantam et al. 2015, with the
"-D" changes that coco-caption ships as "CIDEr"):

    g_k(x)[w]  = tf_x(w) · (log|I| − log max(1, df(w)))        tf-idf of every k-gram w of sentence x
    CIDEr_k    = 1/m Σ_j  exp(−(ℓ_c − ℓ_j)² / 2σ²) · Σ_w min(g_k(c)[w], g_k(s_j)[w]) · g_k(s_j)[w] / (‖g_k(c)‖ ‖g_k(s_j)‖)
    CIDEr-D    = 10 · mean_{k=1..4} CIDEr_k,   σ = 6

df(w) = number of images whose references contain w, |I| = number of images. At evaluation time both come
from the evaluated set itself (so a score depends on the composition of the test set); for SCST rewards they
come from the training references (`CiderD`). Quirks of pycocoevalcap that we keep on purpose:
  - ℓ is the number of *bigrams* (words − 1, and 0 for an empty or one-word sentence), so an empty candidate
    against a 1-word reference has Δℓ = 0 but against a 5-word reference Δℓ = −4.
  - a cosine whose norm is 0 is left undivided (it is 0 anyway: a zero norm means all weights are 0).
  - the corpus score is the plain mean of the per-image scores.
(Where pycocoevalcap crashes, when every reference is empty, we return zeros.)

How the vectorisation works. Words get integer ids; a k-gram is identified by (id of its (k−1)-word prefix,
id of its last word), packed into one int64 key. The sorted distinct keys of each order form the n-gram
vocabulary (an n-gram id is a position in it), found with one stable sort per order; new sentences are looked
up in a fixed vocabulary through a hash table. Each sentence becomes (n-gram, count) entries sorted by n-gram,
so document frequencies, norms and the clipped dot products (a sorted join of candidate entries with the
reference entries of their image) are bincounts and searchsorted calls over flat arrays. The only Python-level
loops are str.split and a dict lookup per word.

Tokenisation: scores assume tokenized strings (space-separated). Evaluation uses the real Java PTB tokenizer
(`dico.metrics.coco.ptb_tokenize`); `simple_tokenize` is a fast Python stand-in for training-time rewards.
"""
from __future__ import annotations

import re
from itertools import chain
from pathlib import Path
from typing import Hashable, Sequence

import numpy as np

_WORD_BITS = 21  # a key is prefix_id << 21 | word_id: room for 2M words and 2^42 prefixes in an int64
_MAX_WORDS = 1 << _WORD_BITS


# ----------------------------------------------------------------------------------------------
# tokenisation stand-in

PTB_PUNCTUATION = frozenset(["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
                             ".", "?", "!", ",", ":", "-", "--", "...", ";"])  # removed by pycocoevalcap
_CLITIC = re.compile(r"(?<=\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_SYMBOL = re.compile(r"([$#%*+=])")
# PTB turns brackets into -LRB- etc. and pycocoevalcap removes '-LRB-', but only upper-case ones: after
# -lowerCase they survive as '-lrb-'. We keep that quirk so rewards see what evaluation sees.
_BRACKETS = str.maketrans({"(": " -lrb- ", ")": " -rrb- ", "[": " -lsb- ", "]": " -rsb- ",
                           "{": " -lcb- ", "}": " -rcb- ", '"': " ", "`": " "})
_BRACKET_TOKENS = frozenset(["-lrb-", "-rrb-", "-lsb-", "-rsb-", "-lcb-", "-rcb-"])
_EDGE = ",!?;:'-"  # punctuation stripped from the ends of a token ('.' handled apart, see below)


def simple_tokenize(text: str) -> str:
    """Fast Python approximation of pycocoevalcap's PTBTokenizer (Stanford PTB, -lowerCase, punctuation removed).

    Lower-cases, splits clitics the PTB way ("don't" -> "do n't", "man's" -> "man 's"), splits $ # % * + =,
    drops the punctuation PTB emits as separate tokens (. , ? ! : ; - -- ... quotes) and collapses whitespace.
    Word-internal punctuation stays ("black-and-white", "3.5", "1,000", "p.m."). Meant for training-time
    rewards only: evaluation must use the real Java tokenizer (`dico.metrics.coco.ptb_tokenize`), which also
    knows abbreviations ("mr." keeps its period there, not here).
    """
    text = _SYMBOL.sub(r" \1 ", text.lower().translate(_BRACKETS))
    words = []
    for tok in _CLITIC.sub(r" \1", text).split():
        if tok in _BRACKET_TOKENS or (tok[0] == "'" and tok[1:].isalpha()):  # kept as they are
            words.append(tok)
            continue
        tok = tok.strip(_EDGE)
        if tok.endswith(".") and "." not in tok.rstrip("."):  # sentence-final "dog." but not "p.m."
            tok = tok.rstrip(".").strip(_EDGE)
        if tok and tok not in PTB_PUNCTUATION:
            words.append(tok)
    return " ".join(words)


# ----------------------------------------------------------------------------------------------
# n-grams as integer arrays

def _split(sentences: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """All whitespace tokens, flattened, and the word count of each sentence (str.split, like precook)."""
    lens = np.fromiter(map(len, map(str.split, sentences)), np.int64, len(sentences))
    return " ".join(sentences).split(), lens  # one big split is 2x faster than chaining per-sentence lists


def _new_vocabulary(flat: list[str]) -> tuple[list[str], np.ndarray]:
    """Distinct words in first-seen order, and the id of every word."""
    words = list(dict.fromkeys(flat))
    return words, np.fromiter(map({w: i for i, w in enumerate(words)}.__getitem__, flat), np.int64, len(flat))


def _word_ids(flat: list[str], vocab: dict[str, int]) -> np.ndarray:
    """Ids of words; words not in `vocab` get fresh ids len(vocab), len(vocab)+1, ... (vocab is not changed)."""
    ids = list(map(vocab.get, flat))
    if None in ids:  # unknown words: one fresh id per distinct word
        fresh = {}
        for p, w in enumerate(flat):
            if ids[p] is None:
                ids[p] = fresh.setdefault(w, len(vocab) + len(fresh))
    return np.array(ids, np.int64)


def _ranges(starts: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """concatenate([arange(s, s + c) for s, c in zip(starts, counts)]) without a Python loop."""
    offsets = np.cumsum(counts) - counts
    return np.repeat(starts - offsets, counts) + np.arange(int(counts.sum()))


def _stable_argsort(keys: np.ndarray) -> np.ndarray:
    """np.argsort(keys, kind="stable"), but when (key, position) fits in an int64, sorting the packed values
    key << b | position is ~30% faster (distinct values: any order is stable, and np.sort beats np.argsort)."""
    b = len(keys).bit_length()
    if len(keys) == 0 or int(keys.max()).bit_length() + b > 63:
        return np.argsort(keys, kind="stable")
    return np.sort((keys << b) | np.arange(len(keys))) & ((1 << b) - 1)


def _group(keys: np.ndarray, sentence: np.ndarray):
    """Group n-gram occurrences (given in sentence order) by key with one stable sort.

    Returns the distinct keys (sorted), each occurrence's run id (index into them) and the entries
    (sentence, run, count) of every distinct (n-gram, sentence) pair, sorted by (run, sentence)."""
    perm = _stable_argsort(keys)  # stable: equal keys stay in sentence order
    keys, sentence = keys[perm], sentence[perm]
    new_key = np.ones(len(keys), bool)
    new_key[1:] = keys[1:] != keys[:-1]
    run = np.cumsum(new_key) - 1
    ids = np.empty_like(run)
    ids[perm] = run
    head = new_key.copy()
    head[1:] |= sentence[1:] != sentence[:-1]
    starts = np.flatnonzero(head)
    count = np.diff(starts, append=len(keys)).astype(np.float64)
    return keys[new_key], ids, (sentence[starts], run[starts], count)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # 2^64/φ: Fibonacci hashing spreads consecutive keys over the table


class _KeyIndex:
    """Sorted distinct n-gram keys (an n-gram id is its position) plus a hash table to find them.

    Open addressing with linear probing at load <= 1/2: table[slot] = position of a key, -1 = empty. A lookup
    costs one or two random reads, where a binary search over a COCO-sized vocabulary (millions of keys, cold in
    cache) costs ~22; that is most of the time of a reward batch."""

    def __init__(self, keys: np.ndarray):
        self.keys = keys
        self.bits = max(4, (2 * len(keys)).bit_length())
        self.table = np.full(1 << self.bits, -1, np.int32 if len(keys) < 2**31 else np.int64)
        pending, slot = np.arange(len(keys)), self._slot(keys)
        while len(pending):  # insert all keys at once; where several want the same free slot, the first wins
            free = np.flatnonzero(self.table[slot] < 0)
            _, first = np.unique(slot[free], return_index=True)
            won = free[first]
            self.table[slot[won]] = pending[won]
            left = np.ones(len(pending), bool)
            left[won] = False
            pending, slot = pending[left], (slot[left] + 1) & (len(self.table) - 1)

    def _slot(self, keys: np.ndarray) -> np.ndarray:
        return ((keys.astype(np.uint64) * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.int64)

    def find(self, keys: np.ndarray) -> np.ndarray:
        """Position of each key in self.keys, -1 where absent."""
        out = np.full(len(keys), -1, np.int64)
        todo, slot = np.arange(len(keys)), self._slot(keys)
        while len(todo):  # probe until a slot holds the key (hit) or is empty (absent)
            pos = self.table[slot]
            hit = pos >= 0
            hit[hit] = self.keys[pos[hit]] == keys[todo[hit]]
            out[todo[hit]] = pos[hit]
            probe = (pos >= 0) & ~hit
            todo, slot = todo[probe], (slot[probe] + 1) & (len(self.table) - 1)
        return out

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Ids of keys; unknown keys get fresh ids len(self.keys), len(self.keys)+1, ... (one per distinct key)."""
        ids = self.find(keys)
        missing = ids < 0
        if missing.any():
            _, fresh = np.unique(keys[missing], return_inverse=True)
            ids[missing] = len(self.keys) + fresh
        return ids


def _ngram_chain(tok: np.ndarray, lens: np.ndarray, n: int, ids_of) -> list[tuple[np.ndarray, np.ndarray]]:
    """For k = 1..n, every k-gram occurrence as (start position, id), in position order.

    A k-gram at position p has the key (id of the (k-1)-gram at p) << 21 | word[p+k-1], and ids_of(k, keys,
    sentence) turns keys into ids, so the ids of one order define the keys of the next."""
    if len(tok) and tok.max() >= _MAX_WORDS:
        raise ValueError(f"more than {_MAX_WORDS} distinct words")
    sentence = np.repeat(np.arange(len(lens)), lens)
    words_left = np.repeat(np.cumsum(lens), lens) - np.arange(len(tok))  # tokens from p to the sentence end
    pos, prefix, out = np.arange(len(tok)), np.zeros(len(tok), np.int64), []
    for k in range(n):
        if k:
            keep = words_left[pos] > k  # a (k+1)-gram starting at p fits in its sentence
            pos, prefix = pos[keep], ids[keep]
        ids = ids_of(k, (prefix << _WORD_BITS) | tok[pos + k], sentence[pos])
        out.append((pos, ids))
    return out


def _build_vocabulary(tok: np.ndarray, lens: np.ndarray, n: int):
    """A new n-gram vocabulary: per order the sorted distinct keys (id = position), the entries of every
    sentence, and the occurrences (position, id). One stable sort per order gives all three."""
    keys, entries = [], []

    def ids_of(k, key, sentence):
        distinct, ids, ent = _group(key, sentence)
        keys.append(distinct)
        entries.append(ent)
        return ids

    occurrences = _ngram_chain(tok, lens, n, ids_of)
    return keys, entries, occurrences


def _lookup_occurrences(tok: np.ndarray, lens: np.ndarray, index: list[_KeyIndex]):
    """Occurrences (position, id) of new sentences in a vocabulary's ids; unknown n-grams get fresh ids >= the
    vocabulary size (consistent within this call), so keys chain exactly as in the vocabulary."""
    return _ngram_chain(tok, lens, len(index), lambda k, key, sentence: index[k].lookup(key))


def _group_occurrences(sentences: list[np.ndarray], ids: list[np.ndarray]):
    """Per order: the distinct ids, and the entries (sentence, run, count) sorted by (run, sentence)."""
    grouped = [_group(i, s) for s, i in zip(sentences, ids)]
    return [d for d, _, _ in grouped], [e for _, _, e in grouped]


def _document_frequency(entries, image_of_sentence: np.ndarray, n_runs: int) -> np.ndarray:
    """df(run) = number of images with that n-gram in a reference. Entries are sorted by (run, sentence) and
    images are contiguous in sentence order, so each (run, image) pair is one contiguous block: count block heads."""
    sentence, run, _ = entries
    image = image_of_sentence[sentence]
    head = np.ones(len(run), bool)
    head[1:] = (run[1:] != run[:-1]) | (image[1:] != image[:-1])
    return np.bincount(run[head], minlength=n_runs).astype(np.int32)


def _bigram_length(lens: np.ndarray) -> np.ndarray:
    """pycocoevalcap's sentence length: the number of bigrams, max(words - 1, 0)."""
    return np.maximum(lens - 1, 0).astype(np.float64)


def _select(entries, keep: np.ndarray, shift: int = 0):
    """The entries where `keep`, with sentence indices shifted down by `shift`."""
    sentence, run, count = entries
    return sentence[keep] - shift, run[keep], count[keep]


# ----------------------------------------------------------------------------------------------
# scoring

def _cider(entries, run_idf, n_ref, ref_group, hyp_group, lens, sigma):
    """CIDEr-D of each candidate against all references of its group.

    entries[k] = (sentence, run, count) of the k-grams of sentences laid out as [references..., candidates...],
    sorted by (run, sentence), with the references of a group contiguous and groups in increasing order;
    run_idf[k] = log|I| - log max(1, df) of each run (distinct k-gram); hyp_group[i] = group of candidate i."""
    n = len(entries)
    n_hyp, n_group = len(lens) - n_ref, int(max(ref_group.max(initial=-1), hyp_group.max(initial=-1))) + 1
    m = np.bincount(ref_group, minlength=n_group)  # references per group
    m_max = max(int(m.max(initial=0)), 1)
    slot = np.arange(n_ref) - (np.cumsum(m) - m)[ref_group]  # number of a reference within its group
    cosine = np.zeros((n_hyp, m_max))
    for entries_k, idf in zip(entries, run_idf):
        is_ref = entries_k[0] < n_ref
        rs, rr, rc = _select(entries_k, is_ref)
        hs, hr, hc = _select(entries_k, ~is_ref, n_ref)
        rw, hw = rc * idf[rr], hc * idf[hr]  # tf-idf values g_k[w]
        # ‖g_k‖ per candidate and per (group, slot) of the references
        h_norm = np.sqrt(np.bincount(hs, hw ** 2, minlength=n_hyp))
        r_norm = np.zeros((n_group, m_max))
        r_norm[ref_group, slot] = np.sqrt(np.bincount(rs, rw ** 2, minlength=n_ref))
        # clipped dot products: join candidate entries with the reference entries of their group on the n-gram.
        # Reference keys (run, group) are already sorted (entries sorted by (run, sentence), groups contiguous).
        # Both sides share the weight w, so min(c_h·w, c_r·w)·c_r·w = min(c_h, c_r)·c_r·w².
        r_key = rr * n_group + ref_group[rs]
        h_key = hr * n_group + hyp_group[hs]
        lo, hi = np.searchsorted(r_key, h_key, "left"), np.searchsorted(r_key, h_key, "right")
        hit = np.repeat(np.arange(len(h_key)), hi - lo)  # candidate entry of each matching pair
        match = _ranges(lo, hi - lo)  # reference entry of each matching pair
        clipped = np.minimum(hc[hit], rc[match]) * rc[match] * idf[hr[hit]] ** 2
        dot = np.bincount(hs[hit] * m_max + slot[rs[match]], clipped, minlength=n_hyp * m_max)
        denom = h_norm[:, None] * r_norm[hyp_group]
        cosine += np.divide(dot.reshape(n_hyp, m_max), denom, out=np.zeros_like(denom), where=denom > 0)
    length = _bigram_length(lens)
    ref_length = np.zeros((n_group, m_max))
    ref_length[ref_group, slot] = length[:n_ref]
    penalty = np.exp(-((length[n_ref:, None] - ref_length[hyp_group]) ** 2) / (2 * sigma ** 2))
    # empty slots (groups with fewer references) have cosine 0, so summing over all m_max slots is exact
    return 10.0 * (cosine / n * penalty).sum(axis=1) / m[hyp_group]


def _idf(df: np.ndarray, log_n: float) -> np.ndarray:
    return log_n - np.log(np.maximum(df, 1.0))


class CiderD:
    """CIDEr-D with document frequencies fixed by a reference corpus (SCST rewards: the training references).

    `score(candidates, refs)` scores against any reference lists; `score_ids(candidates, image_ids)` reuses the
    corpus references of known images, whose n-gram ids are cached. Built from the evaluated set's own
    references it gives pycocoevalcap's numbers (tests check it against `cider_d`).

    Cost for a COCO-sized corpus (113k images x 5 refs): ~10 s to build, a few hundred MB (n-gram keys and
    hash tables, df, and 4 n-gram ids per reference token); `save`/`load` keep it in an .npz.
    """

    def __init__(self, corpus_refs: dict | list, sigma: float = 6.0, n: int = 4):
        self.sigma, self.n = float(sigma), int(n)
        if isinstance(corpus_refs, dict):
            ids, ref_lists = list(corpus_refs), list(corpus_refs.values())
        else:
            ids, ref_lists = list(range(len(corpus_refs))), list(corpus_refs)
        n_refs = np.fromiter(map(len, ref_lists), np.int64, len(ref_lists))
        flat, lens = _split(list(chain.from_iterable(ref_lists)))
        words, tok = _new_vocabulary(flat)
        keys, entries, occurrences = _build_vocabulary(tok, lens, self.n)
        image_of_ref = np.repeat(np.arange(len(ref_lists)), n_refs)
        df = [_document_frequency(e, image_of_ref, len(k)) for k, e in zip(keys, entries)]
        self._set_state(words, keys, df, ids, tok.astype(np.int32), lens, n_refs, occurrences)

    def _set_state(self, words, keys, df, ids, tok, ref_lens, n_refs, occurrences):
        self.words, self.df, self.ids = words, df, ids
        self.index = [_KeyIndex(k) for k in keys]
        self.word_id = {w: i for i, w in enumerate(words)}
        self.row_of_id = {i: r for r, i in enumerate(ids)}
        self.n_images = len(ids)
        self.log_n = float(np.log(float(self.n_images))) if self.n_images else 0.0
        # corpus references: words, and the id of the k-gram starting at each token (-1: does not fit)
        self._tok, self._ref_lens, self._n_refs = tok, ref_lens, n_refs
        self._first_ref = np.cumsum(n_refs) - n_refs
        self._first_tok = np.cumsum(ref_lens) - ref_lens
        if occurrences is None:  # loaded from a file: look the corpus up again (all its n-grams are known)
            occurrences = _lookup_occurrences(tok.astype(np.int64), ref_lens, self.index)
        self._ngram_at = np.full((len(tok), self.n), -1, np.int32)
        for k, (pos, ids_k) in enumerate(occurrences):
            self._ngram_at[pos, k] = ids_k

    def _run_idf(self, distinct_ids: list[np.ndarray]) -> list[np.ndarray]:
        """idf = log|I| - log max(1, df) of n-grams given by vocabulary id; fresh ids (unknown n-grams) have df 0."""
        out = []
        for ids, df in zip(distinct_ids, self.df):
            known = ids < len(df)
            run_df = np.zeros(len(ids))
            run_df[known] = df[ids[known]]
            out.append(_idf(run_df, self.log_n))
        return out

    # -- scoring ---------------------------------------------------------------------------

    def score(self, candidates: Sequence[str], refs: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of candidates[i] against refs[i] (tokenized strings), with the corpus df and |I|."""
        if len(candidates) != len(refs):
            raise ValueError(f"{len(candidates)} candidates but {len(refs)} reference lists")
        n_refs = np.fromiter(map(len, refs), np.int64, len(refs))
        if (n_refs == 0).any():
            raise ValueError("every candidate needs at least one reference")
        flat, lens = _split(list(chain.from_iterable(refs)) + list(candidates))
        occurrences = _lookup_occurrences(_word_ids(flat, self.word_id), lens, self.index)
        sentence = np.repeat(np.arange(len(lens)), lens)
        distinct_ids, entries = _group_occurrences([sentence[p] for p, _ in occurrences],
                                                   [i for _, i in occurrences])
        groups = np.arange(len(refs))
        return _cider(entries, self._run_idf(distinct_ids), int(n_refs.sum()), np.repeat(groups, n_refs),
                      groups, lens, self.sigma)

    def score_ids(self, candidates: Sequence[str], image_ids: Sequence[Hashable]) -> np.ndarray:
        """CIDEr-D of candidates[i] against the corpus references of image_ids[i] (k candidates per image is fine)."""
        if len(candidates) != len(image_ids):
            raise ValueError(f"{len(candidates)} candidates but {len(image_ids)} image ids")
        rows = np.fromiter(map(self.row_of_id.__getitem__, image_ids), np.int64, len(image_ids))
        images, hyp_group = np.unique(rows, return_inverse=True)
        # references of the batch's images: n-gram ids straight from the cache
        n_refs = self._n_refs[images]
        refs = _ranges(self._first_ref[images], n_refs)
        ref_lens = self._ref_lens[refs]
        at = self._ngram_at[_ranges(self._first_tok[refs], ref_lens)]
        ref_sentence = np.repeat(np.arange(len(refs)), ref_lens)
        # candidates: looked up in the vocabulary
        flat, cand_lens = _split(candidates)
        cand_sentence = np.repeat(np.arange(len(refs), len(refs) + len(candidates)), cand_lens)
        occurrences = _lookup_occurrences(_word_ids(flat, self.word_id), cand_lens, self.index)
        sentences, ids = [], []
        for k, (pos, cand_ids) in enumerate(occurrences):
            fits = at[:, k] >= 0  # reference tokens where a k-gram starts
            sentences.append(np.concatenate([ref_sentence[fits], cand_sentence[pos]]))
            ids.append(np.concatenate([at[fits, k].astype(np.int64), cand_ids]))
        distinct_ids, entries = _group_occurrences(sentences, ids)
        return _cider(entries, self._run_idf(distinct_ids), len(refs), np.repeat(np.arange(len(images)), n_refs),
                      hyp_group, np.concatenate([ref_lens, cand_lens]), self.sigma)

    # -- cache ---------------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write the corpus statistics and references to an .npz (no pickle; ids must be all int or all str)."""
        is_int = [isinstance(i, (int, np.integer)) and not isinstance(i, bool) for i in self.ids]
        if not (all(is_int) or all(isinstance(i, str) for i in self.ids)):
            raise TypeError("CiderD.save needs image ids that are all int or all str")
        ids = np.asarray(self.ids, dtype=np.int64 if all(is_int) and self.ids else str)
        arrays = {f"keys{k}": index.keys for k, index in enumerate(self.index)}
        arrays.update({f"df{k}": df for k, df in enumerate(self.df)})
        np.savez_compressed(path, words=np.asarray(self.words, dtype=str), ids=ids, n=np.array(self.n),
                            sigma=np.array(self.sigma), tok=self._tok, ref_lens=self._ref_lens,
                            n_refs=self._n_refs, **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "CiderD":
        with np.load(path, allow_pickle=False) as z:
            self = cls.__new__(cls)
            self.sigma, self.n = float(z["sigma"]), int(z["n"])
            self._set_state(z["words"].tolist(), [z[f"keys{k}"] for k in range(self.n)],
                            [z[f"df{k}"] for k in range(self.n)], z["ids"].tolist(), z["tok"], z["ref_lens"],
                            z["n_refs"], None)
        return self


def cider_d(gts: dict, res: dict, *, n: int = 4, sigma: float = 6.0) -> tuple[float, dict]:
    """Same inputs as pycocoevalcap's Cider().compute_score: gts {id: [tokenized ref str, ...]}, res {id: [tokenized
    candidate str]} (exactly one candidate). Returns (corpus score, {id: score}); equal to pycocoevalcap to 1e-9
    per image. df and |I| come from gts itself, as in coco-caption."""
    if gts.keys() != res.keys():
        raise ValueError("gts and res must have the same ids")
    ids = list(gts)  # pycocoevalcap's order
    for i in ids:
        if not isinstance(res[i], list) or len(res[i]) != 1:
            raise ValueError(f"res[{i!r}] must be a list with exactly one candidate")
        if not isinstance(gts[i], list) or not gts[i]:
            raise ValueError(f"gts[{i!r}] must be a non-empty list of references")
    n_refs = np.fromiter((len(gts[i]) for i in ids), np.int64, len(ids))
    flat, lens = _split(list(chain.from_iterable(gts[i] for i in ids)) + [res[i][0] for i in ids])
    # one vocabulary over references and candidates; df counts references only (candidate-only n-grams: df 0)
    keys, entries, _ = _build_vocabulary(_new_vocabulary(flat)[1], lens, n)
    ref_group = np.repeat(np.arange(len(ids)), n_refs)
    log_n = float(np.log(float(len(ids)))) if ids else 0.0
    n_ref = len(ref_group)
    run_idf = [_idf(_document_frequency(_select(e, e[0] < n_ref), ref_group, len(k)), log_n)
               for k, e in zip(keys, entries)]
    scores = _cider(entries, run_idf, n_ref, ref_group, np.arange(len(ids)), lens, sigma)
    return float(np.mean(scores)) if len(ids) else float("nan"), dict(zip(ids, scores.tolist()))

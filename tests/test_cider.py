"""dico.metrics.cider against pycocoevalcap's Cider (the definition of the numbers we must reproduce)."""
import math
import random
from collections import Counter

import numpy as np
import pytest
from pycocoevalcap.cider.cider import Cider

from dico.metrics.cider import _KeyIndex, cider_d, CiderD, simple_tokenize

TOL = 1e-9


def pycoco(gts, res):
    score, scores = Cider().compute_score(gts, res)
    return float(score), dict(zip(gts, scores))


def assert_matches_pycoco(gts, res):
    want, want_per = pycoco(gts, res)
    got, got_per = cider_d(gts, res)
    assert list(got_per) == list(gts)
    assert got == pytest.approx(want, abs=TOL)
    for i in gts:
        assert got_per[i] == pytest.approx(want_per[i], abs=TOL), i
    return got_per


def random_captions(n_images, seed, vocab=400, refs=(1, 7), max_len=20):
    """Seeded random caption sets: Zipf-ish word frequencies, lengths 0..max_len, refs[0]..refs[1] refs/image."""
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(vocab)]
    weights = [1.0 / (r + 1) for r in range(vocab)]

    def sentence():
        return " ".join(rng.choices(words, weights, k=rng.randint(0, max_len)))

    gts = {i: [sentence() for _ in range(rng.randint(*refs))] for i in range(n_images)}
    res = {i: [sentence()] for i in range(n_images)}
    return gts, res


# ------------------------------------------------------------------------------------------------
# cider_d == pycocoevalcap

EDGE_GTS = {
    "empty_cand": ["a dog runs on the grass", "a brown dog running", "dog on grass"],
    "one_word_cand": ["a cat", "a cat sitting on a mat", "cat"],
    "one_word_refs": ["dog", "cat", "bird"],
    "unseen_words": ["a man riding a horse", "a person on a horse"],
    "repeats": ["a dog and a dog and a dog", "two dogs playing together", "dogs dogs dogs"],
    "seven_refs": ["a red bus", "a bus on the street", "a red double decker bus", "the bus is red",
                   "a bus parked near a curb", "red bus", "a large red bus driving down a street"],
    "six_refs": ["kids play", "children playing soccer", "a group of kids playing soccer in a field",
                 "soccer game", "kids on a field", "young children kick a ball"],
    "empty_ref": ["", "a plate of food", "food on a plate"],
    "exact_copy": ["a woman holding an umbrella in the rain", "a woman with an umbrella"],
    "whitespace": ["  a   train\ton the tracks ", "a train"],
    "long_cand": ["a man", "a person"],
}
EDGE_RES = {
    "empty_cand": [""],
    "one_word_cand": ["cat"],
    "one_word_refs": ["dog"],
    "unseen_words": ["zebra xylophone quantum"],
    "repeats": ["a dog a dog a dog a dog dog dog"],
    "seven_refs": ["a red bus on a street"],
    "six_refs": ["kids playing soccer on a field"],
    "empty_ref": ["a plate with food"],
    "exact_copy": ["a woman holding an umbrella in the rain"],
    "whitespace": ["a train on   the tracks"],
    "long_cand": [" ".join(["a man standing"] * 12)],
}


def test_edge_cases_match_pycocoevalcap():
    per = assert_matches_pycoco(EDGE_GTS, EDGE_RES)
    assert per["empty_cand"] == 0.0 and per["unseen_words"] == 0.0
    assert per["exact_copy"] > per["long_cand"]


@pytest.mark.parametrize("ids", [[0, 1, 2, 3], [(0, "a"), (0, "b"), (1, "a"), (7, 7)], [10, "x", (1, 2), 2.5]])
def test_non_string_ids_keep_order(ids):
    gts = {i: refs for i, refs in zip(ids, list(EDGE_GTS.values())[:4])}
    res = {i: cand for i, cand in zip(ids, list(EDGE_RES.values())[:4])}
    assert_matches_pycoco(gts, res)


def test_single_image_scores_zero():  # log|I| = 0 makes every tf-idf weight 0
    gts, res = {"only": ["a dog on grass", "dog"]}, {"only": ["a dog on grass"]}
    assert_matches_pycoco(gts, res)
    assert cider_d(gts, res)[0] == 0.0


def test_two_images_and_length_quirk():
    # empty candidate vs 1-word ref: pycocoevalcap counts bigrams, so both lengths are 0
    gts = {1: ["dog", "a dog runs"], 2: ["cat sits", "a cat"]}
    res = {1: [""], 2: ["cat sits"]}
    assert_matches_pycoco(gts, res)
    assert_matches_pycoco(gts, {1: ["dog"], 2: ["a cat sits on a mat today"]})


def test_n_and_sigma_options():
    gts, res = random_captions(60, seed=3, vocab=30)
    want = Cider(sigma=2.0).compute_score(gts, res)[1]  # pycocoevalcap only works with n = 4
    np.testing.assert_allclose(list(cider_d(gts, res, sigma=2.0)[1].values()), want, atol=TOL, rtol=0)
    df = corpus_df(gts)
    for n in (1, 2, 3):
        want = [formula_cider(res[i][0], gts[i], df, len(gts), n=n) for i in gts]
        np.testing.assert_allclose(list(cider_d(gts, res, n=n)[1].values()), want, atol=TOL, rtol=0)


def test_random_corpus_500_images():
    gts, res = random_captions(500, seed=0)
    # plant some candidates that overlap their refs a lot, so scores are far from 0
    for i in range(0, 500, 5):
        res[i] = [gts[i][0] + " w1 w1"]
    per = assert_matches_pycoco(gts, res)
    assert max(per.values()) > 1.0


def test_small_vocabulary_many_matches():
    gts, res = random_captions(300, seed=1, vocab=12, refs=(5, 5))
    assert_matches_pycoco(gts, res)


def test_all_references_empty_gives_zeros():  # pycocoevalcap crashes here (max() of an empty df)
    assert cider_d({1: [""], 2: ["", ""]}, {1: ["a dog"], 2: [""]}) == (0.0, {1: 0.0, 2: 0.0})


def test_input_checks():
    with pytest.raises(ValueError):
        cider_d({1: ["a"]}, {2: ["a"]})
    with pytest.raises(ValueError):
        cider_d({1: ["a"]}, {1: ["a", "b"]})
    with pytest.raises(ValueError):
        cider_d({1: []}, {1: ["a"]})


@pytest.mark.slow
def test_5000_images_5_refs():
    gts, res = random_captions(5000, seed=2, vocab=3000, refs=(5, 5))
    assert_matches_pycoco(gts, res)


# ------------------------------------------------------------------------------------------------
# CiderD: corpus document frequencies

def formula_cider(cand, refs, df, n_images, n=4, sigma=6.0):
    """Slow, literal CIDEr-D with a given df table ({ngram tuple: count}) and |I|, for arbitrary references."""

    def vec(s):
        w = s.split()
        grams = Counter(tuple(w[i:i + k]) for k in range(1, n + 1) for i in range(len(w) - k + 1))
        v = {g: c * (math.log(n_images) - math.log(max(1.0, df.get(g, 0)))) for g, c in grams.items()}
        norms = [math.sqrt(sum(x * x for g, x in v.items() if len(g) == k)) for k in range(1, n + 1)]
        return v, norms, max(len(w) - 1, 0)

    vc, nc, lc = vec(cand)
    total = 0.0
    for ref in refs:
        vr, nr, lr = vec(ref)
        for k in range(n):
            dot = sum(min(x, vr.get(g, 0.0)) * vr.get(g, 0.0) for g, x in vc.items() if len(g) == k + 1)
            cos = dot / (nc[k] * nr[k]) if nc[k] and nr[k] else dot
            total += cos * math.exp(-((lc - lr) ** 2) / (2 * sigma ** 2)) / n
    return 10.0 * total / len(refs)


def corpus_df(corpus, n=4):
    df = Counter()
    for refs in corpus.values():
        df.update({tuple(w[i:i + k]) for w in map(str.split, refs) for k in range(1, n + 1)
                   for i in range(len(w) - k + 1)})
    return df


def test_ciderd_built_from_test_refs_equals_cider_d():
    gts, res = random_captions(400, seed=5)
    ids = list(gts)
    cands = [res[i][0] for i in ids]
    _, want = cider_d(gts, res)
    want = np.array([want[i] for i in ids])
    scorer = CiderD(gts)
    np.testing.assert_allclose(scorer.score(cands, [gts[i] for i in ids]), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.score_ids(cands, ids), want, atol=TOL, rtol=0)
    # also with the edge cases (empty refs/cands, repeats, 6-7 refs, unseen words)
    edge = CiderD(EDGE_GTS)
    _, want = cider_d(EDGE_GTS, EDGE_RES)
    np.testing.assert_allclose(edge.score_ids([EDGE_RES[i][0] for i in EDGE_GTS], list(EDGE_GTS)),
                               list(want.values()), atol=TOL, rtol=0)


def test_ciderd_reward_batch():
    """SCST layout: k candidates per image, ids repeated, arbitrary order; scores use the corpus df."""
    train, _ = random_captions(300, seed=6, vocab=60, refs=(5, 5))
    scorer = CiderD(train)
    rng = random.Random(0)
    batch = rng.sample(list(train), 8)
    ids = [i for i in batch for _ in range(5)]
    rng.shuffle(ids)
    cands = [rng.choice(train[i]) if rng.random() < 0.3 else " ".join(rng.choices(["w1", "w2", "w3", "new"], k=6))
             for i in ids] + [""]
    ids.append(batch[0])
    by_id = scorer.score_ids(cands, ids)
    by_refs = scorer.score(cands, [train[i] for i in ids])
    assert by_id.shape == by_refs.shape == (41,)
    np.testing.assert_allclose(by_id, by_refs, atol=TOL, rtol=0)
    df = corpus_df(train)
    want = [formula_cider(c, train[i], df, len(train)) for c, i in zip(cands, ids)]
    np.testing.assert_allclose(by_id, want, atol=TOL, rtol=0)
    assert by_id[-1] == 0.0


def test_ciderd_arbitrary_refs_and_list_corpus():
    train, _ = random_captions(120, seed=7, vocab=50)
    scorer = CiderD(list(train.values()))  # list of lists: ids are positions
    refs = [["w1 w2 w3 brand new words", "w4 w5"], ["never seen before"], train[3]]
    cands = ["w1 w2 w3 brand new", "never seen before before", "w0 w1 w2"]
    df = corpus_df(train)
    want = [formula_cider(c, r, df, len(train)) for c, r in zip(cands, refs)]
    np.testing.assert_allclose(scorer.score(cands, refs), want, atol=TOL, rtol=0)
    np.testing.assert_allclose(scorer.score_ids(cands[2:], [3]), want[2:], atol=TOL, rtol=0)
    with pytest.raises(ValueError):
        scorer.score(["a"], [[]])


def test_ciderd_save_load(tmp_path):
    train, res = random_captions(200, seed=8)
    scorer = CiderD({f"img{i}": r for i, r in train.items()})
    scorer.save(tmp_path / "cider.npz")
    loaded = CiderD.load(tmp_path / "cider.npz")
    ids = [f"img{i}" for i in range(0, 200, 3)]
    cands = [res[int(i[3:])][0] for i in ids]
    np.testing.assert_array_equal(loaded.score_ids(cands, ids), scorer.score_ids(cands, ids))
    with pytest.raises(TypeError):
        CiderD({(1, 2): ["a b"]}).save(tmp_path / "bad.npz")


def test_key_index_finds_exactly_the_keys():
    rng = np.random.default_rng(0)
    keys = np.unique(rng.integers(0, 2**40, 5000))
    index = _KeyIndex(keys)
    queries = np.concatenate([keys[::-3], rng.integers(0, 2**40, 500), keys[:10]])
    pos = np.searchsorted(keys, queries)
    present = keys[np.minimum(pos, len(keys) - 1)] == queries
    np.testing.assert_array_equal(index.find(queries), np.where(present, pos, -1))
    assert _KeyIndex(keys[:0]).find(queries[:3]).tolist() == [-1, -1, -1]


# ------------------------------------------------------------------------------------------------
# simple_tokenize

def test_simple_tokenize_examples():
    assert simple_tokenize("A Man's dog is running.") == "a man 's dog is running"
    assert simple_tokenize("Two people don't like the black-and-white cat!") == \
        "two people do n't like the black-and-white cat"
    assert simple_tokenize('it\'s 5:30 p.m. -- time... to go; "ok"?') == "it 's 5:30 p.m. time to go ok"
    assert simple_tokenize("  a dog,  a cat ,and 1,000 birds (small)  ") == \
        "a dog a cat and 1,000 birds -lrb- small -rrb-"
    assert simple_tokenize("") == ""


def test_simple_tokenize_agrees_with_ptb_on_typical_captions():
    import shutil

    if shutil.which("java") is None:
        pytest.skip("no java")
    from dico.metrics.coco import ptb_tokenize

    caps = ["A man riding a wave on top of a surfboard.", "Two dogs, one brown and one white, play.",
            "A woman's hand holding a cell-phone!", "There is a cat that isn't sleeping on the couch",
            "A plate with rice; beans and (some) salad...", 'The sign says "STOP" in red letters',
            "A 12-year-old boy flies a kite at 5:30 pm", "Three zebras grazing   in a field ."]
    ptb = ptb_tokenize({i: [c] for i, c in enumerate(caps)})
    assert [simple_tokenize(c) for c in caps] == [ptb[i][0] for i in range(len(caps))]


def docstring_sentences(limit: int) -> list[str]:
    """Real English written by other people: first sentences of the docstrings of installed libraries
    (pinned versions, so the corpus is fixed). Tokenised the way CIDEr inputs are (lower case, words)."""
    import ast
    import importlib.util
    import re
    from pathlib import Path

    out = []
    for package in ("numpy", "scipy", "pandas", "matplotlib"):
        root = Path(importlib.util.find_spec(package).submodule_search_locations[0])
        for path in sorted(root.rglob("*.py")):
            try:
                tree = ast.parse(path.read_text(errors="ignore"))
            except (SyntaxError, ValueError):
                continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)):
                    doc = ast.get_docstring(node)
                    if doc:
                        words = re.findall(r"[a-z]+", doc.split(".")[0].lower())
                        if 3 <= len(words) <= 25:
                            out.append(" ".join(words))
                if len(out) >= limit:
                    return out
    return out


@pytest.mark.slow
def test_5000_images_of_text_we_did_not_write():
    """5,000 "images", each with 5 references and a candidate taken from a sliding window over
    10,005 real sentences (neighbouring images share references, as near-duplicate COCO images do)."""
    sentences = docstring_sentences(10_005)
    assert len(sentences) == 10_005
    gts = {i: sentences[2 * i:2 * i + 5] for i in range(5000)}
    res = {i: [sentences[2 * i + 5]] for i in range(5000)}
    assert_matches_pycoco(gts, res)

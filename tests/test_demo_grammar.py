"""dico.demo.grammatical (the demo's fluency measure, diversity.fluent_pct) against an independent
reference: the one-shape language written out string by string from the generator's word lists, and
every caption the generator writes."""
import itertools
import random

import pytest

from dico import demo
from dico.cider import simple_tokenize
from dico.demo import grammatical
from dico.metrics import NO_GRAMMAR, diversity


def _one_shape_language(colours, backgrounds) -> set[str]:
    """Every caption `demo.caption` can write of a one-shape scene, enumerated by brute force."""
    sizes = [""] + [w + " " for ws in demo.SIZE_WORDS.values() for w in ws]
    positions = ["the center", "the left", "the right", "the top", "the bottom",
                 *(f"the {r} {c}" for r in ("top", "bottom") for c in ("left", "right"))]
    bare = {f"{s}{c} {w}" for s in sizes for c in colours for ws in demo.SHAPE_WORDS.values() for w in ws}
    article = {("an " if p[0] in "aeiou" else "a ") + p for p in bare}
    texts = set(article)
    texts |= {f"a picture of {p}" for p in article} | {f"there is {p}" for p in article}
    texts |= {f"{p} in {q}" for p in article for q in positions}
    texts |= {f"an image with {p} in {q}" for p in article for q in positions}
    texts |= {f"a single {p}" for p in bare}
    suffixes = [""] + [f" {v} a {b} background" for v in ("on", "against") for b in backgrounds]
    return {t + s for t in texts for s in suffixes}


def _mutations(words: list[str], rng: random.Random):
    i = rng.randrange(len(words))
    yield words[:i] + words[i + 1:]                          # a word dropped
    yield words[:i] + [words[i]] + words[i:]                 # a word repeated
    if i + 1 < len(words):
        yield words[:i] + [words[i + 1], words[i]] + words[i + 2:]  # two words swapped
    yield words[:i] + [rng.choice(["a", "an", "the", "and", "of"])] + words[i + 1:]  # a word replaced


def test_one_shape_captions_equal_the_brute_force_language():
    language = _one_shape_language(demo.COLOURS, demo.BACKGROUNDS)
    rng = random.Random(0)
    sample = rng.sample(sorted(language), 3000)
    assert all(grammatical(t) for t in sample)
    checked = rejected = 0
    colour_words = set(demo.COLOURS) | set(demo.UNSEEN_COLOURS)
    for text in sample:
        for m in _mutations(text.split(), rng):
            if sum(w in colour_words for w in m) != 1:
                continue  # fewer or more shapes than one: outside the enumerated language
            mutated = " ".join(m)
            assert grammatical(mutated) == (mutated in language), mutated
            checked += 1
            rejected += mutated not in language
    assert checked > 5000 and rejected > 0.8 * checked


@pytest.mark.parametrize("variant", [None, "backgrounds", "colours"])
def test_every_reference_the_generator_writes_is_grammatical(variant):
    rng = random.Random(1)
    colours, backgrounds = demo.VARIANTS[variant]
    for _ in range(400):
        scene = demo.random_scene(rng, colours, backgrounds)
        for text in demo.captions(scene, rng, 5):
            assert grammatical(text), text
            assert grammatical(text.upper() + " .")  # compared after simple_tokenize, as the metrics see it


@pytest.mark.parametrize("text", [
    "a red red circle",                              # a word repeated
    "an red circle", "a orange box",                 # the article does not agree
    "a red circle and a red disk",                   # the same shape twice: random_scene never draws it
    "a small red circle to the left of",             # cut short
    "a red circle on a background",
    "a single a red circle",
    "red circle",                                    # no article
    "a red circle in the middle",                    # position() says "the center"
    "a red circle , a blue box",                     # three-shape template with two shapes
])
def test_what_the_grammar_cannot_produce(text):
    assert not grammatical(text)


@pytest.mark.parametrize("text", [
    "an orange diamond above a big green box on a white background",
    "three shapes: a red circle, a tiny blue triangle and an orange rhombus",
    "a yellow square to the right of a yellow circle, with a purple disk",
    "an image with a large red round shape in the top left against a black background",
])
def test_what_the_grammar_produces(text):
    assert grammatical(text) and grammatical(simple_tokenize(text))


def test_fluent_pct_in_diversity_only_with_a_grammar():
    cands = ["a red circle", "a red red circle", "there is a blue box", "circle red a"]
    with_grammar = diversity(cands, [], grammar=grammatical)
    assert with_grammar["fluent_pct"] == 50.0 and "fluent_pct_reason" not in with_grammar
    without = diversity(cands, [])
    assert without["fluent_pct"] is None and without["fluent_pct_reason"] == NO_GRAMMAR


def test_grammar_of_a_split_file(tmp_path):
    import json

    for dataset, expect in (("demo", grammatical), ("demo-unseen-colours", grammatical), ("coco", None)):
        path = tmp_path / f"{dataset}.json"
        path.write_text(json.dumps({"format": "dico-splits-v1", "dataset": dataset, "splits": {}}))
        assert demo.grammar_of(path) is expect
    assert demo.grammar_of(None) is None


def test_the_enumeration_is_not_trivially_small():
    assert len(_one_shape_language(demo.COLOURS, demo.BACKGROUNDS)) > 50_000
    assert not any(grammatical(" ".join(p)) for p in itertools.permutations(["a", "red", "circle"]) if
                   " ".join(p) != "a red circle")


def test_swapped_variants_are_grammatical_other_scenes_and_undo_themselves():
    rng = random.Random(2)
    seen = {"attributes": 0, "relation": 0}
    for _ in range(300):
        scene = demo.random_scene(rng)
        for text in demo.captions(scene, rng, 5):
            for kind, variant in demo.swapped(text).items():
                if variant is None:
                    continue
                seen[kind] += 1
                assert grammatical(variant) and variant != simple_tokenize(text), (kind, text, variant)
                assert demo.swapped(variant)[kind] == simple_tokenize(text)  # swapping twice undoes it
    assert seen["attributes"] > 100 and seen["relation"] > 100


@pytest.mark.parametrize("text, attributes, relation", [
    ("a large red circle to the left of an orange box", "a large orange circle to the left of a red box",
     "an orange box to the left of a large red circle"),
    ("a red circle and a blue box", "a blue circle and a red box", None),       # no relation to swap
    ("a red circle above a red box", None, "a red box above a red circle"),     # one colour: same scene
    ("a blue circle above a green disk", None, "a green disk above a blue circle"),  # one shape class
    ("there is a blue circle", None, None),
])
def test_swapped_by_hand(text, attributes, relation):
    assert demo.swapped(text) == {"attributes": attributes, "relation": relation}


def test_pretraining_pairs_are_demo_scenes_read_back_from_jpeg():
    """Deterministic from the seed, the same with worker processes, five grammatical captions each,
    and each image the JPEG file make_demo_data would write for that scene, read back."""
    import io
    import random

    import numpy as np
    from PIL import Image

    from dico.demo import captions, grammatical, pretraining_pairs, random_scene, render

    pairs = pretraining_pairs(6, 48, seed=5)
    again = pretraining_pairs(6, 48, seed=5, workers=2)
    assert [c for _, c in pairs] == [c for _, c in again]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for (a, _), (b, _) in zip(pairs, again))
    assert [c for _, c in pretraining_pairs(6, 48, seed=6)] != [c for _, c in pairs]
    rng = random.Random(5)  # the same draws by hand: scene, then its captions
    for image, refs in pairs:
        scene = random_scene(rng)
        assert refs == captions(scene, rng) and all(grammatical(r) for r in refs)
        buf = io.BytesIO()
        render(scene, 48).save(buf, format="JPEG", quality=90)
        assert image.size == (48, 48) and np.array_equal(np.asarray(image), np.asarray(Image.open(buf).convert("RGB")))

"""dico.demo.grammatical (the demo's fluency measure, diversity.fluent_pct) against an independent
reference: the one-shape language written out string by string from the generator's word lists, and
every caption the generator writes."""
import itertools
import random

import pytest

from dico import demo
from dico.metrics.cider import simple_tokenize
from dico.demo import grammatical
from dico.metrics.diversity import diversity, NO_GRAMMAR


POSITIONS = ("the center", "the left", "the right", "the top", "the bottom",
             *(f"the {r} {c}" for r in ("top", "bottom") for c in ("left", "right")))


def _one_shape_language(colours, backgrounds, sizes=tuple(demo.SIZE_WORDS), shapes=tuple(demo.SHAPE_WORDS),
                        positions=POSITIONS) -> set[str]:
    """Every caption `demo.caption` can write of a one-shape scene, enumerated by brute force; with
    one colour, background, size, shape and position: the captions of that one scene."""
    sizes = [""] + [w + " " for s in sizes for w in demo.SIZE_WORDS[s]]
    bare = {f"{s}{c} {w}" for s in sizes for c in colours for shape in shapes for w in demo.SHAPE_WORDS[shape]}
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


# -- describes: which scenes a caption is true of (the stand-ins' retrieval hits) -------------------
def _language_of(scene) -> set[str]:
    (sh,) = scene.shapes
    return _one_shape_language([sh.colour], [scene.background], [sh.size], [sh.shape], [demo.position(sh)])


def test_describes_one_shape_scenes_as_their_brute_force_languages():
    """Scenes that share colour and shape but differ in size, background or cell: a caption is true of
    exactly the scenes whose written-out language holds it."""
    from dico.demo import Scene, Shape, describes

    cells = [(0.5, 0.5), (1 / 6, 5 / 6), (5 / 6, 0.5)]
    scenes = [Scene(bg, (Shape(c, shape, size, x, y),)) for c in ("red", "orange") for shape in ("circle", "diamond")
              for size in demo.SIZES for bg in ("white", "black") for x, y in cells]
    languages = [_language_of(sc) for sc in scenes]
    rng = random.Random(4)
    pool = sorted({t for lang in languages for t in rng.sample(sorted(lang), 25)})
    shared = 0
    for scene, language in zip(scenes, languages):
        for text in pool:
            assert describes(text, scene) == (text in language), (text, scene)
        shared += sum(text in language for text in pool)
    assert shared > 2 * len(pool)  # captions true of several scenes are what the test is about


def _rejittered(scene, rng):
    """The scene with every shape drawn again in its cell (new jitter, as `random_scene` draws it)."""
    from dataclasses import replace

    def again(v):
        return (min(int(v * 3), 2) + 0.5) / 3 + rng.uniform(-0.04, 0.04)
    return replace(scene, shapes=tuple(replace(sh, x=again(sh.x), y=again(sh.y)) for sh in scene.shapes))


def test_describes_every_caption_the_generator_writes_for_the_same_cells():
    """Completeness: a caption of the scene, or of the scene with its shapes jittered anew in their cells
    (on a diagonal placement the jitter picks the relation word), is true of it."""
    from dico.demo import describes

    rng = random.Random(5)
    diagonal = 0
    for _ in range(1500):
        scene = demo.random_scene(rng)
        for variant in (scene, _rejittered(scene, rng), _rejittered(scene, rng)):
            for text in demo.captions(variant, rng, 5):
                assert describes(text, scene), (text, scene)
        cells = [demo.cell(sh) for sh in scene.shapes]
        diagonal += any(abs(a[0] - b[0]) == abs(a[1] - b[1]) for a, b in itertools.combinations(cells, 2))
    assert diagonal > 100


def _scene(background, *shapes):
    """Shapes as (colour, shape, size, column, row) on the 3 x 3 grid, at their cells' centres."""
    from dico.demo import Scene, Shape

    return Scene(background, tuple(Shape(c, s, z, (col + 0.5) / 3, (row + 0.5) / 3) for c, s, z, col, row in shapes))


RED_LEFT = _scene("white", ("red", "circle", "large", 0, 1), ("blue", "square", "small", 2, 1))
DIAGONAL = _scene("grey", ("red", "circle", "large", 0, 0), ("blue", "square", "small", 1, 1))
THREE = _scene("black", ("red", "circle", "large", 0, 0), ("blue", "square", "small", 2, 0),
               ("green", "triangle", "large", 1, 2))


@pytest.mark.parametrize("text,scene,true", [
    ("a big red disk to the left of a little blue box", RED_LEFT, True),
    ("a small blue block right of a red circle on a white background", RED_LEFT, True),
    ("a red circle next to a blue square", RED_LEFT, True),           # "next to" holds of any pair
    ("two shapes: a blue square and a red circle", RED_LEFT, True),
    ("a red circle right of a blue square", RED_LEFT, False),         # the relation reversed
    ("a red circle above a blue square", RED_LEFT, False),            # the other axis, not diagonal
    ("a blue circle left of a red square", RED_LEFT, False),          # the colours bound the other way
    ("a small red circle left of a blue square", RED_LEFT, False),    # a size wrong
    ("a red circle left of a blue square on a black background", RED_LEFT, False),
    ("a red circle", RED_LEFT, False),                                # a shape left out
    ("a red circle left of a blue square and a green triangle", RED_LEFT, False),  # one too many
    ("a red circle above a blue square", DIAGONAL, True),             # a diagonal: both axes' words
    ("a red circle left of a blue square", DIAGONAL, True),
    ("a blue square below a red circle", DIAGONAL, True),
    ("a red circle below a blue square", DIAGONAL, False),
    ("a red circle left of a blue square and a green triangle", THREE, True),
    ("a green triangle below a red circle, with a blue square", THREE, True),   # one row down, one across
    ("a green triangle left of a red circle, with a blue square", THREE, False),
    ("a red circle, a blue square and a large green triangle against a black background", THREE, True),
    ("a red circle, a blue square and a small green triangle", THREE, False),
    ("a red red circle, a blue square and a green triangle", THREE, False),     # not a caption at all
])
def test_describes_by_hand(text, scene, true):
    from dico.demo import describes

    assert describes(text, scene) is true


def test_describes_position_and_a_single_shape():
    from dico.demo import describes

    corner = _scene("grey", ("yellow", "diamond", "small", 2, 2))
    assert describes("an image with a yellow rhombus in the bottom right", corner)
    assert describes("a single small yellow diamond on a grey background", corner)
    assert not describes("a yellow diamond in the center", corner)
    assert not describes("a single large yellow diamond", corner)
    assert not describes("there is a yellow triangle", corner)

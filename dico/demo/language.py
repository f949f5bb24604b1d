"""The language of the demo's captions: which texts its templates can write (`grammatical`, the
demo's fluency measure), which scenes a caption is true of (`describes`, what the stand-ins'
retrieval counts as a hit) and the swap test's variants of a caption (`swapped`).

The demo knows the grammar its references come from, so it can say exactly whether a generated
caption is one the grammar can produce. Words are compared after `simple_tokenize` (lower case, no
punctuation), as the metrics see them.
"""
from __future__ import annotations

import functools
import re

from ..metrics.cider import simple_tokenize
from .captions import RELATION_WORDS, SHAPE_WORDS, SIZE_WORDS, a_or_an
from .scenes import BACKGROUNDS, COLOURS, UNSEEN_BACKGROUNDS, UNSEEN_COLOURS, Scene, Shape, cell, position


def _alternatives(words) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True)) + ")"


_SHAPE_CLASS = {w: shape for shape, ws in SHAPE_WORDS.items() for w in ws}
_ALL_COLOURS = [*COLOURS, *UNSEEN_COLOURS]          # any palette the demo draws (out-of-domain sets too)
_ALL_BACKGROUNDS = [*BACKGROUNDS, *UNSEEN_BACKGROUNDS]


def _phrase(name: str, article: bool = True) -> str:
    """A noun phrase: [a|an] [size] colour shape, capturing article, colour and shape word."""
    size = _alternatives(w for ws in SIZE_WORDS.values() for w in ws)
    core = (rf"(?P<{name}_first>(?:{size} )?(?P<{name}_colour>{_alternatives(_ALL_COLOURS)}) "
            rf"(?P<{name}_shape>{_alternatives(_SHAPE_CLASS)}))")
    return rf"(?P<{name}_art>an?) {core}" if article else core


@functools.cache
def _templates() -> list:
    """One regular expression per caption template of `captions.caption`, without its punctuation."""
    rel = _alternatives(w for ws in RELATION_WORDS.values() for w in ws)
    pos = r"(?P<pos>the (?:center|left|right|top|bottom|(?:top|bottom) (?:left|right)))"
    a, b, c = _phrase("a"), _phrase("b"), _phrase("c")
    rel = f"(?P<rel>{rel})"  # templates with a relation between a and b capture it (`swapped`)
    templates = [  # `caption` without its punctuation, template by template
        a, f"a picture of {a}", f"there is {a}", f"{a} in {pos}", f"an image with {a} in {pos}",
        f"a single {_phrase('a', article=False)}",
        f"{a} {rel} {b}", f"{a} and {b}", f"two shapes {a} and {b}", f"{a} next to {b}",
        f"{a} {b} and {c}", f"three shapes {a} {b} and {c}", f"{a} {rel} {b} and {c}", f"{a} {rel} {b} with {c}",
        f"a group of shapes with {a} {b} and {c}",
    ]
    background = rf"(?: (?:on|against) a (?P<background>{_alternatives(_ALL_BACKGROUNDS)}) background)?"
    return [re.compile(t + background) for t in templates]


def _parses(text: str):
    """(match, names of its noun phrases) per caption template `text` fits as a caption the templates
    can write: articles agree ("an orange", "a red") and the shapes named differ in colour or shape,
    as `random_scene` draws them. Compared after `simple_tokenize`."""
    words = simple_tokenize(text)
    for template in _templates():
        m = template.fullmatch(words)
        if m is None:
            continue
        names = [n for n in "abc" if m.groupdict().get(f"{n}_colour")]
        if any(m.groupdict().get(f"{n}_art") not in (None, a_or_an(m[f"{n}_first"])) for n in names):
            continue
        shapes = [(m[f"{n}_colour"], _SHAPE_CLASS[m[f"{n}_shape"]]) for n in names]
        if len(set(shapes)) == len(shapes):
            yield m, names


def grammatical(text: str) -> bool:
    """Whether the demo's caption templates (`caption`) can produce `text` (compared after
    `simple_tokenize`), with any colour, background and scene: articles agree ("an orange", "a red"),
    and the shapes of one caption differ in colour or shape, as `random_scene` draws them."""
    return next(_parses(text), None) is not None



# -- truth: which scenes a caption describes --------------------------------------------------
_SIZE_OF = {w: size for size, ws in SIZE_WORDS.items() for w in ws}
_RELATION_OF = {w: rel for rel, ws in RELATION_WORDS.items() for w in ws}


def _holds(rel: str, a: Shape, b: Shape) -> bool:
    """"a <rel> b" on the grid: a is on that side of b, at least as many cells away along that axis as
    along the other. A diagonal placement (as far on both axes) admits both words: there `relation`
    names whichever axis the shapes' jitter happened to make longer."""
    (ax, ay), (bx, by) = cell(a), cell(b)
    along = {"left": bx - ax, "right": ax - bx, "above": by - ay, "below": ay - by}[rel]
    return along > 0 and along >= (abs(ay - by) if rel in ("left", "right") else abs(ax - bx))


def describes(text: str, scene: Scene) -> bool:
    """Whether `text` is true of `scene`: a grammatical caption (`grammatical`) that names every shape
    of the scene once, each with its colour, shape and (where given) size, and whose relation,
    position and background (where given) hold in it. These are the captions `caption` writes for
    the scene, except that on a diagonal placement either axis's relation word holds (`_holds`).
    Generated scenes repeat ("a big red circle" alone on white and alone on grey), so a caption is
    often true of other scenes than its own: what the stand-ins' retrieval counts as a hit."""
    for m, names in _parses(text):
        named = {}
        for n in names:
            size = _SIZE_OF.get(m[f"{n}_first"].split()[0])
            fits = [sh for sh in scene.shapes if sh.colour == m[f"{n}_colour"]
                    and sh.shape == _SHAPE_CLASS[m[f"{n}_shape"]] and size in (None, sh.size)]
            if len(fits) == 1:  # (colour, shape) pairs are unique within a scene
                named[n] = fits[0]
        if len(named) != len(names) or len(set(named.values())) != len(scene.shapes):
            continue
        if m.groupdict().get("rel") and not _holds(_RELATION_OF[m["rel"]], named["a"], named["b"]):
            continue
        where = m.groupdict().get("pos")
        if where and position(named["a"]) != where:
            continue
        background = m.groupdict().get("background")
        if background and background != scene.background:
            continue
        return True
    return False


# -- the swap test: a caption describing another scene ------------------------------------------
def swapped(text: str) -> dict[str, str | None]:
    """The swap test's variants of a caption with two or more shapes (after `simple_tokenize`), each
    describing another scene: "attributes" swaps the colours of its first two shapes ("a red circle
    left of a blue box" -> "a blue circle left of a red box"), "relation" swaps the two sides of its
    relation ("a blue box left of a red circle"). None where the caption has no such pair: one shape,
    no relation ("a and b"), equal colours / shapes (the swap would give the same scene back), or a
    swap that would name one shape twice."""
    words = simple_tokenize(text)
    out: dict[str, str | None] = {"attributes": None, "relation": None}
    m = next((m for t in _templates() if (m := t.fullmatch(words))), None)
    if m is None or not m.groupdict().get("b_colour"):
        return out
    first, second = m["a_first"], m["b_first"]  # the phrases without their articles (they follow them)
    if m["a_colour"] != m["b_colour"] and _SHAPE_CLASS[m["a_shape"]] != _SHAPE_CLASS[m["b_shape"]]:
        out["attributes"] = _replace_phrases(words, m, _swap_word(first, m["a_colour"], m["b_colour"]),
                                             _swap_word(second, m["b_colour"], m["a_colour"]))
    if m.groupdict().get("rel"):
        out["relation"] = _replace_phrases(words, m, second, first)
    # a swap that names one shape twice (a third shape has the swapped colour) describes no scene
    return {kind: v if v is not None and grammatical(v) else None for kind, v in out.items()}


def _swap_word(phrase: str, old: str, new: str) -> str:
    return " ".join(new if w == old else w for w in phrase.split())


def _replace_phrases(words: str, m, new_a: str, new_b: str) -> str:
    """`words` with noun phrases a and b (article included) replaced by new_a and new_b, each with the
    article it needs."""
    a0, b0, b1 = m.start("a_art"), m.start("b_art"), m.end("b_first")
    return (words[:a0] + f"{a_or_an(new_a)} {new_a}" + words[m.end("a_first"):b0] + f"{a_or_an(new_b)} {new_b}"
            + words[b1:])

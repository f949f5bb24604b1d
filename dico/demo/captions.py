"""The demo's captions: five varied references per scene from a handful of templates.

Synonyms ("big"/"large", "box"/"square"), word order ("a left of b" / "b right of a") and optional
details (size, background, position): the references disagree on details, as COCO's do, so a
captioner trained with XE learns the common core and a detail-seeking reward has room to improve on it.
"""
from __future__ import annotations

import random

from .scenes import Scene, Shape, position, relation

SHAPE_WORDS = {"circle": ["circle", "circle", "disk", "round shape"],
               "square": ["square", "square", "box", "block"],
               "triangle": ["triangle", "triangle", "triangular shape"],
               "diamond": ["diamond", "diamond", "rhombus"]}
SIZE_WORDS = {"small": ["small", "small", "little", "tiny"], "large": ["large", "large", "big"]}
RELATION_WORDS = {"left": ["to the left of", "left of", "on the left of"],
                  "right": ["to the right of", "right of", "on the right of"],
                  "above": ["above", "over", "on top of"],
                  "below": ["below", "under", "beneath"]}
OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above"}


def a_or_an(phrase: str) -> str:
    """The article a noun phrase takes ("an orange box", "a red circle")."""
    return "an" if phrase[0] in "aeiou" else "a"


def _noun_phrase(sh: Shape, rng: random.Random, p_size: float, article: bool = True) -> str:
    words = []
    if rng.random() < p_size:
        words.append(rng.choice(SIZE_WORDS[sh.size]))
    words += [sh.colour, rng.choice(SHAPE_WORDS[sh.shape])]
    phrase = " ".join(words)
    if not article:
        return phrase
    return f"{a_or_an(phrase)} {phrase}"


def _with_background(text: str, scene: Scene, rng: random.Random, p: float) -> str:
    if rng.random() < p:
        return text + rng.choice([" on a {} background", " against a {} background"]).format(scene.background)
    return text


def caption(scene: Scene, rng: random.Random) -> str:
    """One caption of the scene, with random template, synonyms and optional details."""
    shapes = list(scene.shapes)
    p_size = rng.choice((0.3, 0.6, 0.9))
    np = lambda sh, art=True: _noun_phrase(sh, rng, p_size, art)  # noqa: E731
    if len(shapes) == 1:
        a = shapes[0]
        text = rng.choice([
            lambda: np(a),
            lambda: f"a picture of {np(a)}",
            lambda: f"there is {np(a)}",
            lambda: f"{np(a)} in {position(a)}",
            lambda: f"an image with {np(a)} in {position(a)}",
            lambda: f"a single {np(a, False)}",
        ])()
        return _with_background(text, scene, rng, 0.35)
    if len(shapes) == 2:
        a, b = rng.sample(shapes, 2)
        rel = relation(a, b)
        text = rng.choice([
            lambda: f"{np(a)} {rng.choice(RELATION_WORDS[rel])} {np(b)}",
            lambda: f"{np(a)} {rng.choice(RELATION_WORDS[rel])} {np(b)}",
            lambda: f"{np(b)} {rng.choice(RELATION_WORDS[OPPOSITE[rel]])} {np(a)}",
            lambda: f"{np(a)} and {np(b)}",
            lambda: f"two shapes: {np(a)} and {np(b)}",
            lambda: f"{np(a)} next to {np(b)}",
        ])()
        return _with_background(text, scene, rng, 0.3)
    a, b, c = rng.sample(shapes, 3)
    rel = relation(a, b)
    text = rng.choice([
        lambda: f"{np(a)}, {np(b)} and {np(c)}",
        lambda: f"three shapes: {np(a)}, {np(b)} and {np(c)}",
        lambda: f"{np(a)} {rng.choice(RELATION_WORDS[rel])} {np(b)} and {np(c)}",
        lambda: f"{np(a)} {rng.choice(RELATION_WORDS[rel])} {np(b)}, with {np(c)}",
        lambda: f"a group of shapes with {np(a)}, {np(b)} and {np(c)}",
    ])()
    return _with_background(text, scene, rng, 0.25)


def captions(scene: Scene, rng: random.Random, n: int = 5) -> list[str]:
    """n distinct captions (retrying a few times; short scenes may repeat a caption)."""
    out: list[str] = []
    for _ in range(n * 10):
        c = caption(scene, rng)
        if c not in out:
            out.append(c)
        if len(out) == n:
            break
    while len(out) < n:
        out.append(caption(scene, rng))
    return out

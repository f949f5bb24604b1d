"""The demo's scenes: one to three coloured shapes on a 3 x 3 grid, and how they are drawn.

A second, out-of-domain palette (`VARIANTS`: backgrounds or shape colours never seen in training) is
the demo's stand-in for nocaps' novel objects (evaluate.datasets, format demo).
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
    "yellow": (235, 210, 40), "purple": (140, 60, 180), "orange": (245, 140, 30),
}
BACKGROUNDS = {"white": (245, 245, 245), "grey": (150, 150, 150), "black": (25, 25, 25)}
# Out-of-domain palettes (variant): names and RGB values the training set never uses.
UNSEEN_BACKGROUNDS = {"brown": (120, 80, 45), "pink": (240, 175, 200), "teal": (30, 125, 125)}
UNSEEN_COLOURS = {"pink": (240, 120, 190), "brown": (130, 80, 40), "cyan": (40, 200, 220), "lime": (170, 230, 50)}
VARIANTS = {None: (COLOURS, BACKGROUNDS), "backgrounds": (COLOURS, UNSEEN_BACKGROUNDS),
            "colours": (UNSEEN_COLOURS, BACKGROUNDS)}
_RGB = {**COLOURS, **UNSEEN_COLOURS}  # render() looks shape colours up here,
_BACKGROUND_RGB = {**BACKGROUNDS, **UNSEEN_BACKGROUNDS}  # and backgrounds here
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")


@dataclass(frozen=True)
class Shape:
    colour: str
    shape: str
    size: str
    x: float  # centre, as a fraction of the image side
    y: float


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]


def random_scene(rng: random.Random, colours: dict = COLOURS, backgrounds: dict = BACKGROUNDS) -> Scene:
    """1-3 distinct shapes placed on a 3x3 grid so that pairwise relations are unambiguous."""
    n = rng.choice((1, 2, 2, 3, 3))
    cells = rng.sample([(cx, cy) for cx in range(3) for cy in range(3)], n)
    if n == 1:
        cells = [(1, 1)] if rng.random() < 0.5 else cells
    shapes, used = [], set()
    for cx, cy in cells:
        while True:  # no two identical (colour, shape) pairs: captions must be able to tell them apart
            colour, shape = rng.choice(list(colours)), rng.choice(SHAPES)
            if (colour, shape) not in used:
                used.add((colour, shape))
                break
        jitter = lambda: rng.uniform(-0.04, 0.04)  # noqa: E731
        shapes.append(Shape(colour, shape, rng.choice(SIZES),
                            (cx + 0.5) / 3 + jitter(), (cy + 0.5) / 3 + jitter()))
    return Scene(rng.choice(list(backgrounds)), tuple(shapes))


def render(scene: Scene, size: int) -> Image.Image:
    """Draw at 4x and downsample, for anti-aliased edges (closer to natural images than hard pixels)."""
    s = size * 4
    im = Image.new("RGB", (s, s), _BACKGROUND_RGB[scene.background])
    draw = ImageDraw.Draw(im)
    for sh in scene.shapes:
        r = s * (0.07 if sh.size == "small" else 0.14)
        cx, cy = sh.x * s, sh.y * s
        fill = _RGB[sh.colour]
        if sh.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
        elif sh.shape == "square":
            q = r * 0.88
            draw.rectangle([cx - q, cy - q, cx + q, cy + q], fill=fill)
        elif sh.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=fill)
        else:  # diamond
            draw.polygon([(cx, cy - r * 1.1), (cx + r * 0.8, cy), (cx, cy + r * 1.1), (cx - r * 0.8, cy)], fill=fill)
    return im.resize((size, size), Image.LANCZOS)


def relation(a: Shape, b: Shape) -> str:
    """Where a is relative to b, along the axis on which they are further apart."""
    dx, dy = a.x - b.x, a.y - b.y
    if abs(dx) >= abs(dy):
        return "left" if dx < 0 else "right"
    return "above" if dy < 0 else "below"


def cell(sh: Shape) -> tuple[int, int]:
    """The (column, row) of the scenes' 3 x 3 grid a shape is drawn in (`random_scene`)."""
    return min(int(sh.x * 3), 2), min(int(sh.y * 3), 2)


def position(sh: Shape) -> str:
    col, row = cell(sh)
    col, row = ("left", "center", "right")[col], ("top", "middle", "bottom")[row]
    if (row, col) == ("middle", "center"):
        return "the center"
    if row == "middle":
        return f"the {col}"
    if col == "center":
        return f"the {row}"
    return f"the {row} {col}"



def scene_json(scene: Scene) -> dict:
    """The "scene" entry a demo image carries in the Karpathy file (x and y rounded to 3 decimals)."""
    return {"background": scene.background,
            "shapes": [{"colour": s.colour, "shape": s.shape, "size": s.size,
                        "x": round(s.x, 3), "y": round(s.y, 3)} for s in scene.shapes]}


def scene_from_json(d: dict) -> Scene:
    """The `Scene` of a demo image's "scene" entry (the inverse of `scene_json`, up to its rounding)."""
    return Scene(d["background"], tuple(Shape(s["colour"], s["shape"], s["size"], s["x"], s["y"])
                                        for s in d["shapes"]))

"""Embedded demo data: scenes of coloured shapes with five varied captions each.

Nothing real (COCO, CLIP weights) can be shipped or downloaded in tests, so the demo generates a
small captioning data set that exercises every code path of the paper's pipeline:

* 1-3 shapes per image, each with a colour, a shape and a size, on one of a few backgrounds, with
  spatial relations between them; written as JPEG so the real decoding path is used;
* five reference captions per image drawn from varied templates: synonyms ("big"/"large",
  "box"/"square"), word order ("a left of b" / "b right of a"), optional details (size, background,
  position). The references disagree on details, as COCO's do, so a captioner trained with XE learns
  the common core and a detail-seeking reward (the demo evaluator) has room to improve on it;
* a Karpathy-format split file with the same schema as COCO's `dataset_coco.json`.

Deterministic from a seed: the same seed gives byte-identical JPEGs and captions.

A second, out-of-domain demo set (evaluate.datasets, format demo) draws the same kind of scenes with
`variant="backgrounds"` (backgrounds never seen in training: brown, pink, teal) or
`variant="colours"` (shapes in colours never seen: pink, brown, cyan, lime), the demo's stand-in for
nocaps' novel objects: the captioner and the evaluators only ever saw the training palette.
"""
from __future__ import annotations

import functools
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

from .io import atomic_path, read_json, write_json

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
JPEG_QUALITY = 90  # of the demo files; the in-memory pretraining scenes go through the same round trip

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


# -- scenes ------------------------------------------------------------------------------------
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


def _cell(sh: Shape) -> tuple[int, int]:
    """The (column, row) of the scenes' 3 x 3 grid a shape is drawn in (`random_scene`)."""
    return min(int(sh.x * 3), 2), min(int(sh.y * 3), 2)


def position(sh: Shape) -> str:
    col, row = _cell(sh)
    col, row = ("left", "center", "right")[col], ("top", "middle", "bottom")[row]
    if (row, col) == ("middle", "center"):
        return "the center"
    if row == "middle":
        return f"the {col}"
    if col == "center":
        return f"the {row}"
    return f"the {row} {col}"


# -- captions ----------------------------------------------------------------------------------
def _article(phrase: str) -> str:
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
    return f"{_article(phrase)} {phrase}"


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


# -- fluency: the language of the caption templates ---------------------------------------------
# The demo knows the grammar its references come from, so it can say exactly whether a generated
# caption is one the grammar can produce (`grammatical`): the demo's fluency measure (fluent_pct).
# Words are compared after `simple_tokenize` (lower case, no punctuation), as the metrics see them.
def _alternatives(words) -> str:
    import re

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


def _grammar():
    import re

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


@functools.cache
def _templates() -> list:
    return _grammar()


def _parses(text: str):
    """(match, names of its noun phrases) per caption template `text` fits as a caption the templates
    can write: articles agree ("an orange", "a red") and the shapes named differ in colour or shape,
    as `random_scene` draws them. Compared after `simple_tokenize`."""
    from .cider import simple_tokenize

    words = simple_tokenize(text)
    for template in _templates():
        m = template.fullmatch(words)
        if m is None:
            continue
        names = [n for n in "abc" if m.groupdict().get(f"{n}_colour")]
        if any(m.groupdict().get(f"{n}_art") not in (None, _article(m[f"{n}_first"])) for n in names):
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
    (ax, ay), (bx, by) = _cell(a), _cell(b)
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


def scene_from_json(d: dict) -> Scene:
    """The `Scene` of a demo image's "scene" entry (the inverse of `_scene_json`, up to its rounding)."""
    return Scene(d["background"], tuple(Shape(s["colour"], s["shape"], s["size"], s["x"], s["y"])
                                        for s in d["shapes"]))


def split_scenes(splits_json, split: str) -> list[Scene] | None:
    """The scenes of a split of a demo set's normalised split file, in record order; None when its
    records carry no scenes (any set but the demo's)."""
    records = read_json(splits_json)["splits"][split]
    if not records or not all("scene" in r for r in records):
        return None
    return [scene_from_json(r["scene"]) for r in records]


def grammar_of(splits_json):
    """`grammatical` when `splits_json` (a dico-splits file) is a demo set (its `dataset` is "demo" or
    "demo-unseen-..."), else None: only the demo knows the grammar of its references."""
    if not splits_json:
        return None
    dataset = str(read_json(splits_json).get("dataset", ""))
    return grammatical if dataset.startswith("demo") else None


def swapped(text: str) -> dict[str, str | None]:
    """The swap test's variants of a caption with two or more shapes (after `simple_tokenize`), each
    describing another scene: "attributes" swaps the colours of its first two shapes ("a red circle
    left of a blue box" -> "a blue circle left of a red box"), "relation" swaps the two sides of its
    relation ("a blue box left of a red circle"). None where the caption has no such pair: one shape,
    no relation ("a and b"), equal colours / shapes (the swap would give the same scene back), or a
    swap that would name one shape twice."""
    from .cider import simple_tokenize

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
    return (words[:a0] + f"{_article(new_a)} {new_a}" + words[m.end("a_first"):b0] + f"{_article(new_b)} {new_b}"
            + words[b1:])


# -- hard negatives for the demo evaluator -------------------------------------------------------
# Groups of interchangeable words: a hard negative replaces a word by one from ANOTHER synonym set
# of its group (so "big" -> "small" but never "big" -> "large").
_SWAP_GROUPS = [
    [[c] for c in COLOURS],
    [SIZE_WORDS["small"][1:], SIZE_WORDS["large"][1:]],
    [[b] for b in BACKGROUNDS],
    [["circle", "disk"], ["square", "box", "block"], ["triangle"], ["diamond", "rhombus"]],
    [["left"], ["right"]],
    [["above", "over"], ["below", "under", "beneath"]],
]


def hard_negative_words() -> list[str]:
    """Every word `perturb_caption` can write (a demo CLIP's token table must hold them)."""
    return sorted({w for group in _SWAP_GROUPS for synonyms in group for w in synonyms})


def perturb_caption(text: str, rng: random.Random) -> str | None:
    """A caption that reads the same but is wrong in one detail (colour, size, shape, background or
    relation). Used as a hard negative when the demo evaluator is trained, which makes it sensitive
    to details, as PAC-S's positive-augmented training makes it more discriminative than CLIP."""
    words = text.split()
    options = []
    for i, w in enumerate(words):
        for group in _SWAP_GROUPS:
            for k, synonyms in enumerate(group):
                if w.strip(",:") in synonyms:
                    options.append((i, [s for j, s in enumerate(group) if j != k]))
    if not options:
        return None
    i, others = rng.choice(options)
    word = words[i].strip(",:")
    words[i] = words[i].replace(word, rng.choice(rng.choice(others)))
    if i > 0 and words[i - 1] in ("a", "an"):  # keep the article right: a wrong one would give it away
        words[i - 1] = _article(words[i])
    return " ".join(words)


# -- the data set --------------------------------------------------------------------------------
def make_demo_data(out_dir: str | Path, n_train: int, n_val: int, n_test: int, image_size: int,
                   seed: int, refs_per_image: int = 5, jpeg_quality: int = JPEG_QUALITY, variant: str | None = None) -> Path:
    """Write `out_dir/images/{split}/NNNNNN.jpg` and `out_dir/dataset_demo.json` (Karpathy schema).

    Returns the path of the split file. The JSON is written last, so its presence means the images
    are complete. `variant` ("backgrounds" / "colours"): the out-of-domain palettes (module docstring).
    """
    from tqdm import tqdm

    if variant not in VARIANTS:
        raise ValueError(f"unknown demo variant {variant!r} (one of: {', '.join(v for v in VARIANTS if v)})")
    colours, backgrounds = VARIANTS[variant]
    out_dir = Path(out_dir)
    rng = random.Random(seed)
    images, sentid = [], 0
    plan = [("train", n_train), ("val", n_val), ("test", n_test)]
    total = sum(n for _, n in plan)
    with tqdm(total=total, desc="demo images", unit="img", mininterval=1.0) as bar:
        imgid = 0
        for split, n in plan:
            for _ in range(n):
                scene = random_scene(rng, colours, backgrounds)
                refs = captions(scene, rng, refs_per_image)
                filename = f"{imgid:06d}.jpg"
                path = out_dir / "images" / split / filename
                with atomic_path(path) as tmp:
                    render(scene, image_size).save(tmp, format="JPEG", quality=jpeg_quality)
                sentences = [{"tokens": r.replace(",", " ,").replace(":", " :").split(), "raw": r,
                              "imgid": imgid, "sentid": sentid + k} for k, r in enumerate(refs)]
                images.append({"filepath": split, "filename": filename, "imgid": imgid, "cocoid": imgid,
                               "split": split, "sentids": [s["sentid"] for s in sentences],
                               "sentences": sentences, "scene": _scene_json(scene)})
                sentid += len(refs)
                imgid += 1
                bar.update()
    split_file = out_dir / "dataset_demo.json"
    name = "demo" if variant is None else f"demo-unseen-{variant}"
    write_json(split_file, {"dataset": name, "seed": seed, **({"variant": variant} if variant else {}),
                            "images": images})
    return split_file


def pretraining_pairs(n: int, image_size: int, seed: int, jpeg_quality: int = JPEG_QUALITY,
                      workers: int = 1) -> list[tuple[Image.Image, list[str]]]:
    """`n` (image, five captions) pairs of new random scenes, kept in memory and never written: the
    stand-ins' stand-in for the data CLIP and PAC-S are trained on beyond COCO (OpenAI CLIP's web pairs;
    PAC-S's generated positives). Each image goes through a JPEG encode and decode at the demo's quality,
    so it looks like the demo's files. Deterministic from `seed` (scenes and captions are drawn here in
    order; `workers` processes only draw the images)."""
    rng = random.Random(seed)
    scenes, refs = [], []
    for _ in range(n):
        scenes.append(random_scene(rng))
        refs.append(captions(scenes[-1], rng))
    jobs = [(scene, image_size, jpeg_quality) for scene in scenes]
    if workers > 1 and n > 1:
        import multiprocessing

        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            images = pool.map(_jpeg_scene, jobs, chunksize=max(1, n // (4 * workers)))
    else:
        images = [_jpeg_scene(j) for j in jobs]
    return list(zip(images, refs))


def _jpeg_scene(job) -> Image.Image:
    """A scene drawn at `size` and read back from a JPEG at `quality` (what its demo file would hold)."""
    import io

    scene, size, quality = job
    buf = io.BytesIO()
    render(scene, size).save(buf, format="JPEG", quality=quality)
    buf.seek(0)
    return Image.open(buf).convert("RGB")


def _scene_json(scene: Scene) -> dict:
    return {"background": scene.background,
            "shapes": [{"colour": s.colour, "shape": s.shape, "size": s.size,
                        "x": round(s.x, 3), "y": round(s.y, 3)} for s in scene.shapes]}

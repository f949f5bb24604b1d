"""Hard negatives for the demo's PAC-S stand-in: a caption wrong in one detail.

Training `pac` with them makes it sensitive to details, as PAC-S's positive-augmented training makes
it more discriminative than CLIP.
"""
from __future__ import annotations

import random

from .captions import SIZE_WORDS, a_or_an
from .scenes import BACKGROUNDS, COLOURS

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
        words[i - 1] = a_or_an(words[i])
    return " ".join(words)

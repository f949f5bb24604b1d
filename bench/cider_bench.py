"""Speed of dico.metrics.cider against pycocoevalcap, both timed in this process on the same synthetic captions.

    python bench/cider_bench.py          # full: 5,000 test images; a 113,287-image training corpus (Karpathy train)
    python bench/cider_bench.py --quick  # small sizes, for CI

Each function returns one line `name: <what was compared> <ratio>x` (ratio = median baseline time / median dico
time over interleaved repetitions, so both sides see the same machine load). Captions are COCO-like: ~7-14
words from a template grammar with Zipf-distributed content words (~10k word vocabulary), 5 references per
image that describe the same latent scene, so n-gram overlap and vocabulary size resemble the real test set.
"""
from __future__ import annotations

import random
import statistics
import sys
import time
from itertools import accumulate
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from dico.metrics.cider import cider_d, CiderD  # noqa: E402


class CaptionGenerator:
    """'a <adj> <subject> <verb> a <adj> <object> <place>' with Zipf word choices; one latent scene per image."""

    def __init__(self, seed: int, vocab: int = 10_000):
        self.rng = random.Random(seed)
        words = [f"w{i}" for i in range(vocab)]
        self.pools = {role: words[k::5] for k, role in enumerate(["subject", "adj", "verb", "object", "place"])}
        self.cum = {role: list(accumulate(1.0 / (r + 1) ** 1.1 for r in range(len(p)))) for role, p in self.pools.items()}

    def word(self, role: str) -> str:
        return self.rng.choices(self.pools[role], cum_weights=self.cum[role])[0]

    def scene(self) -> dict:
        return {role: self.word(role) for role in self.pools}

    def caption(self, scene: dict) -> str:
        rng, pick = self.rng, lambda role: scene[role] if rng.random() < 0.8 else self.word(role)  # paraphrase noise
        words = [rng.choice(["a", "the", "one"])] + ([pick("adj")] if rng.random() < 0.5 else [])
        words += [pick("subject"), "is" if rng.random() < 0.3 else "", pick("verb"), rng.choice(["a", "the", "some"])]
        words += ([pick("adj")] if rng.random() < 0.5 else []) + [pick("object")]
        if rng.random() < 0.7:
            words += [rng.choice(["in", "on", "near", "at"]), "the", pick("place")]
        return " ".join(w for w in words if w)

    def dataset(self, n_images: int, n_refs: int = 5) -> tuple[dict, dict]:
        """gts {id: [n_refs refs]}, res {id: [one candidate]} (the candidate is a sample of the same scene)."""
        scenes = [self.scene() for _ in range(n_images)]
        gts = {i: [self.caption(s) for _ in range(n_refs)] for i, s in enumerate(scenes)}
        res = {i: [self.caption(s)] for i, s in enumerate(scenes)}
        return gts, res


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _medians(baseline, ours, repeats: int) -> tuple[float, float]:
    """Interleaved repetitions; medians of both."""
    times = [(_timed(baseline), _timed(ours)) for _ in range(repeats)]
    return statistics.median(t for t, _ in times), statistics.median(t for _, t in times)


def bench_cider(quick: bool, n_images: int | None = None, repeats: int | None = None) -> str:
    """From scratch on a test set: pycocoevalcap Cider().compute_score vs dico.metrics.cider.cider_d."""
    from pycocoevalcap.cider.cider import Cider

    n_images = n_images or (1000 if quick else 5000)
    repeats = repeats or (3 if quick else 5)
    gts, res = CaptionGenerator(seed=0).dataset(n_images)
    want = Cider().compute_score(gts, res)[1]  # correctness first: same numbers
    got = np.array(list(cider_d(gts, res)[1].values()))
    assert np.abs(got - want).max() < 1e-9
    base, ours = _medians(lambda: Cider().compute_score(gts, res), lambda: cider_d(gts, res), repeats)
    return (f"cider: pycocoevalcap Cider().compute_score vs dico cider_d, {n_images} images x 5 refs, "
            f"exact (max |diff| < 1e-9), median of {repeats} ({base:.3f} s vs {ours:.3f} s) {base / ours:.1f}x")


def bench_cider_reward(quick: bool, batch_images: int = 50) -> str:
    """One SCST step (50 images x 5 sampled candidates): what pycocoevalcap would do (a CiderScorer built from
    the 250 candidates and their references, df over the batch) vs CiderD.score_ids (train df precomputed once).
    The df differ (batch vs training corpus), so this compares speed only; CiderD's numbers are tested separately."""
    from pycocoevalcap.cider.cider_scorer import CiderScorer

    n_train, n_batches = (10_000, 20) if quick else (113_287, 40)
    gen = CaptionGenerator(seed=1)
    scenes = [gen.scene() for _ in range(n_train)]
    train = {i: [gen.caption(s) for _ in range(5)] for i, s in enumerate(scenes)}
    start = time.perf_counter()
    scorer = CiderD(train)
    build = time.perf_counter() - start
    rng = random.Random(2)
    batches = []
    for _ in range(n_batches):
        ids = [i for i in rng.sample(range(n_train), batch_images) for _ in range(5)]
        batches.append((ids, [gen.caption(scenes[i]) for i in ids]))

    def pycoco(ids, cands):
        cs = CiderScorer(n=4, sigma=6.0)
        for c, i in zip(cands, ids):
            cs += (c, train[i])
        return cs.compute_score()

    times = [(_timed(lambda: pycoco(ids, cands)), _timed(lambda: scorer.score_ids(cands, ids)))
             for ids, cands in batches]
    base, ours = statistics.median(t for t, _ in times), statistics.median(t for _, t in times)
    return (f"cider_reward: per SCST step of {batch_images} images x 5 candidates, pycocoevalcap CiderScorer rebuilt on the batch "
            f"(batch df) vs dico CiderD.score_ids (df of a {n_train}-image train corpus, built once in {build:.1f} s; "
            f"speed only, the df differ), median of {n_batches} batches ({base * 1e3:.1f} ms vs {ours * 1e3:.2f} ms) "
            f"{base / ours:.1f}x")


if __name__ == "__main__":
    quick = "--quick" in sys.argv
    print(bench_cider(quick))
    print(bench_cider_reward(quick))

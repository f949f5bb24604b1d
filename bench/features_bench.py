"""Grid-feature caching: dico.features.cache_features vs a one-image-at-a-time loop, same model.

COCO-like 640x480 JPEGs (bench/images.py) are written to a temporary directory. The model is a small
random open_clip ViT (224 px, patch 32, 2 layers x 128 wide: 50 grid tokens), so that on 2 CPU cores,
as on a GPU with ViT-L/14, decoding the JPEGs costs more than the model and the pipeline decides the
throughput.
- loop: for each image, dico.images.load_image -> evaluator.preprocess -> grid_features on a batch of 1,
  features to fp16, one np.save at the end (the naive script);
- cache_features: the library call the `cache_features` rule makes (DataLoader workers decode and
  preprocess while the main process runs the model on large batches; fp16 .npy shard; index.json);
- draft: the same call with `jpeg_draft=True` (config `features.jpeg_draft`; PIL draft: DCT-domain
  1/2-scale decode of the 640x480 JPEGs, then the same bicubic resize/crop).
The second line, jpeg_draft, isolates the decode + preprocess of one image in one process.
"""
from __future__ import annotations

import shutil
import statistics
import tempfile
from pathlib import Path

import numpy as np
import torch

import images
from common import interleaved, tiny_evaluator


def _cpu_seconds() -> float:
    """CPU time of this process and of its finished children (the DataLoader workers, once joined)."""
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _with_cpu(fn, log: list):
    def run():
        start = _cpu_seconds()
        fn()
        log.append(_cpu_seconds() - start)
    return run


def _feature_model():
    return tiny_evaluator(image_size=224, patch_size=32, vision_width=128, vision_layers=2)


class FeatureBench:
    def __init__(self, n_images: int, batch_size: int = 16, workers: int = 2):
        from dico.data import ImageRecord
        from dico.clip_weights import save_evaluator

        self.tmp = Path(tempfile.mkdtemp(prefix="dico-bench-features-"))
        self.paths = images.write_jpegs(self.tmp / "jpg", n_images, seed=0)
        self.records = [ImageRecord(i, p, ("a caption",)) for i, p in enumerate(self.paths)]
        self.ev = _feature_model()
        self.ckpt = self.tmp / "evaluator.pt"
        save_evaluator(self.ev.model, self.ckpt)
        self.batch_size, self.workers, self.runs = batch_size, workers, 0

    def close(self):
        shutil.rmtree(self.tmp, ignore_errors=True)

    def loop(self) -> np.ndarray:
        from dico.images import load_image

        out = []
        with torch.no_grad():
            for r in self.records:
                x = self.ev.preprocess(load_image(r.path, "bench"))
                out.append(self.ev.grid_features(x[None])[0].numpy().astype(np.float16))
        feats = np.stack(out)
        np.save(self.tmp / "loop.npy", feats)
        return feats

    def pipeline(self, num_workers: int | None = None, batch_size: int | None = None,
                 shard_size: int | None = None, jpeg_draft: bool = False) -> np.ndarray:
        from dico.features import cache_features

        self.runs += 1
        out_dir = self.tmp / f"run{self.runs}"
        index = cache_features(self.ev, "bench", self.ckpt, self.records, "bench", out_dir,
                               shard_size=shard_size or len(self.records), batch_size=batch_size or self.batch_size,
                               num_workers=self.workers if num_workers is None else num_workers,
                               jpeg_draft=jpeg_draft, log=lambda *a, **k: None)
        feats = np.concatenate([np.load(out_dir / s["file"]) for s in index["shards"]])
        shutil.rmtree(out_dir)
        return feats

    def draft(self) -> np.ndarray:
        return self.pipeline(jpeg_draft=True)


def bench_features(quick: bool, n_images: int | None = None, repeats: int | None = None) -> str:
    n = n_images or (160 if quick else 192)
    repeats = repeats or 3
    fb = FeatureBench(n)
    try:
        kb = images.mean_file_kb(fb.paths)
        ref, got, dr = fb.loop(), fb.pipeline(), fb.draft()
        assert np.allclose(ref.astype(np.float32), got.astype(np.float32), atol=2e-2, rtol=1e-2), \
            "cache_features and the loop give different features"
        scale = np.abs(ref.astype(np.float32)).mean()
        draft_err = np.abs(dr.astype(np.float32) - ref.astype(np.float32)).mean() / scale
        cpu = {k: [] for k in ("loop", "pipeline", "draft")}
        t = interleaved({k: _with_cpu(fn, cpu[k]) for k, fn in
                         (("loop", fb.loop), ("pipeline", fb.pipeline), ("draft", fb.draft))}, repeats, warmup=0)
    finally:
        fb.close()
    ips = {k: n / v for k, v in t.items()}
    ms = {k: statistics.median(v) / n * 1e3 for k, v in cpu.items()}
    return (f"features: grid-feature caching of {n} COCO-like 640x480 JPEGs ({kb:.0f} KB mean) through a small "
            f"open_clip ViT (224 px, patch 32, 2x128), dico.features.cache_features ({fb.workers} decode workers, "
            f"batch {fb.batch_size}) {ips['pipeline']:.0f} img/s vs one-image-at-a-time loop {ips['loop']:.0f} img/s "
            f"[with features.jpeg_draft: {ips['draft']:.0f} img/s, {ips['draft'] / ips['pipeline']:.2f}x "
            f"over cache_features, features of the random tiny ViT differ by {draft_err * 100:.1f}% mean relative]; "
            f"CPU time per image (all processes) loop {ms['loop']:.1f} ms, cache_features {ms['pipeline']:.1f} ms, "
            f"draft {ms['draft']:.1f} ms: the workers add throughput only where idle cores exist; median of {repeats} "
            f"{ips['pipeline'] / ips['loop']:.1f}x")


def bench_jpeg_draft(quick: bool, n_images: int | None = None, repeats: int | None = None) -> str:
    """Decode + CLIP preprocess (to a normalised tensor) per image, one process: draft vs full decode."""
    from dico.images import load_image
    from dico.clip_model import clip_preprocess

    n = n_images or (24 if quick else 64)
    repeats = repeats or (3 if quick else 5)
    tmp = Path(tempfile.mkdtemp(prefix="dico-bench-jpeg-"))
    try:
        paths = images.write_jpegs(tmp, n, seed=1)
        ev = _feature_model()
        err_mean, err_max = images.draft_pixel_error(paths[:16])
        t = interleaved({"full": lambda: [clip_preprocess(load_image(p), 224, ev.mean, ev.std) for p in paths],
                         "draft": lambda: [clip_preprocess(load_image(p, draft_size=224), 224, ev.mean, ev.std)
                                           for p in paths]}, repeats)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return (f"jpeg_draft: decode + CLIP preprocess (bicubic 224, crop, normalise) of {n} COCO-like 640x480 JPEGs in "
            f"one process, dico.images.load_image(draft_size=224) (PIL draft: DCT-domain decode at 320x240) vs full "
            f"decode, both + clip_preprocess: {t['draft'] / n * 1e3:.2f} vs {t['full'] / n * 1e3:.2f} ms/img, "
            f"pixels differ by {err_mean:.2f}/255 mean ({err_max:.0f} max); median of {repeats} "
            f"{t['full'] / t['draft']:.1f}x")


def scaling_features(quick: bool) -> list[str]:
    """cache_features throughput vs decode workers (0, 1, 2) and batch size."""
    n = 96 if quick else 128
    repeats = 2 if quick else 3
    fb = FeatureBench(n)
    try:
        fns = {f"w{w}": (lambda w=w: fb.pipeline(num_workers=w)) for w in (0, 1, 2)}
        fns["w2_b64"] = lambda: fb.pipeline(num_workers=2, batch_size=64)
        fns["w2_shard"] = lambda: fb.pipeline(num_workers=2, shard_size=2 * fb.batch_size)
        fns["loop"] = fb.loop
        t = interleaved(fns, repeats)
    finally:
        fb.close()
    return [f"scaling_features: cache_features on {n} JPEGs, img/s with 0/1/2 decode workers (batch 16): "
            + " / ".join(f"{n / t[f'w{w}']:.0f}" for w in (0, 1, 2))
            + f"; 2 workers at batch 64: {n / t['w2_b64']:.0f} (a worker decodes a whole batch, so n/batch must "
            + f"exceed the workers for any overlap); 2 workers, shards of {2 * fb.batch_size} images (one "
            + f"DataLoader across the shards) {n / t['w2_shard']:.0f}; "
            + f"loop {n / t['loop']:.0f}; 2 workers vs in-process decoding "
            + f"{t['w0'] / t['w2']:.1f}x"]

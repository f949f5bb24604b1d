"""Frozen grid features of the captioner's backbone, cached once per split.

The paper's captioner reads all 257 tokens (CLS + 16x16 patches) x 1024 of CLIP ViT-L/14 before the
final layer norm and projection (dico.md section 3). The backbone is frozen, so the features are
computed once and stored as fp16 in memory-mappable `.npy` shards:

    results/features/<backbone>/<split>/shard_00000.npy   [n, T, D] float16
    results/features/<backbone>/<split>/index.json        written last: what the shards hold

Shards are written atomically and the index is written last, so a killed job resumes at the first
missing shard (a fingerprint of backbone checkpoint + image list guards against mixing shards of
different runs) and a reader never trusts half a split.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from .data import ImageRecord, load_image
from .io import atomic_path, read_json, remove_stale_temporaries, write_json

FORMAT = "dico-features-v1"


class _Images(torch.utils.data.Dataset):
    """Decodes and preprocesses images in DataLoader workers, overlapping with the model."""

    def __init__(self, records: list[ImageRecord], preprocess, split: str, skip_broken: bool, size: int,
                 draft_size: int | None = None):
        self.records, self.preprocess, self.split = records, preprocess, split
        self.skip_broken, self.size, self.draft_size = skip_broken, size, draft_size

    def __len__(self):
        return len(self.records)

    def __getitem__(self, i):
        try:
            return self.preprocess(load_image(self.records[i].path, self.split, self.draft_size)), True, i
        except (OSError, ValueError):
            if not self.skip_broken:
                raise
            return torch.zeros(3, self.size, self.size), False, i


def fingerprint(checkpoint: str | Path, records: list[ImageRecord], shard_size: int, dtype: str) -> str:
    """Identifies what the shards of a split were computed from (not the image bytes: too slow)."""
    stat = Path(checkpoint).stat()
    h = hashlib.sha256()
    h.update(f"{Path(checkpoint).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{shard_size}:{dtype}".encode())
    for r in records:
        h.update(f"{r.image_id}:{r.path}\n".encode())
    return h.hexdigest()[:16]


def cache_features(evaluator, backbone: str, checkpoint: str | Path, records: list[ImageRecord],
                   split: str, out_dir: str | Path, *, shard_size: int, batch_size: int,
                   dtype: str = "float16", num_workers: int = 0, skip_broken: bool = False,
                   jpeg_draft: bool = False, device: str = "cpu", log=print) -> dict:
    """Compute and store grid features of `records`; resume at the first missing shard.

    `progress.json` records the fingerprint and, per finished shard, the images skipped in it; a
    shard counts as done only if it is listed there and its file holds the expected array, so a
    shard killed mid-write, truncated or left by another configuration is recomputed, and the
    skipped images of shards cached by an earlier (killed) attempt are still reported.

    One DataLoader covers every shard still to compute, so the decoding workers never idle at a
    shard boundary, and rows go straight into a memory-mapped temporary of their shard (no copy of
    the shard in RAM: 2,048 ViT-L/14 images are 1 GB in fp16, 4 GB as a float32 list).
    `jpeg_draft` lets libjpeg decode at a reduced scale (still >= the model's input size) before the
    resize: ~1.7x cheaper decoding, pixels ~1.5/255 off CLIP's reference preprocessing, so opt-in.
    """
    from tqdm import tqdm

    if not records:
        raise ValueError(f"split {split!r} has no images: nothing to cache features of")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # an index from an earlier run must not describe the shards while they are being replaced
    (out_dir / "index.json").unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)
    fp = fingerprint(checkpoint, records, shard_size, dtype + (":draft" if jpeg_draft else ""))
    progress_file = out_dir / "progress.json"
    progress = _read_progress(progress_file)
    if progress.get("fingerprint") != fp:
        if progress_file.exists() or any(out_dir.glob("shard_*.npy")):
            log(f"{out_dir}: shards from a different backbone/image list/settings; recomputing them")
        for old in out_dir.glob("shard_*.npy"):
            old.unlink()
        progress = {"fingerprint": fp, "done": {}}
        write_json(progress_file, progress)

    n_shards = (len(records) + shard_size - 1) // shard_size
    shards, todo, skipped, done_before, shape = [], [], [], 0, None
    for s in range(n_shards):
        lo, hi = s * shard_size, min((s + 1) * shard_size, len(records))
        path = out_dir / f"shard_{s:05d}.npy"
        shards.append({"file": path.name, "start": lo, "count": hi - lo})
        done = progress["done"].get(path.name)
        found = _complete_shard_shape(path, hi - lo, shape, dtype) if done is not None else None
        if found is not None:
            shape = found
            skipped += done["skipped"]
            done_before += hi - lo
        else:
            todo.append((s, lo, hi))

    start_time = time.time()
    bar = tqdm(total=len(records), initial=done_before, desc=f"features {split}", unit="img", mininterval=2.0)
    for s, lo, hi, feat_shape, ok in _compute(evaluator, records, todo, split, shard_size, batch_size, num_workers,
                                              skip_broken, jpeg_draft, dtype, out_dir, device, bar):
        if not ok.any() and hi - lo > 1:
            raise ValueError(f"none of the {hi - lo} images {records[lo].path} ... {records[hi - 1].path} "
                             f"(split {split!r}) could be read; check data.image_root in the config "
                             "(features.skip_broken_images only covers a few broken files)")
        if shape is not None and tuple(feat_shape) != tuple(shape):
            raise RuntimeError(f"shard {s} of {out_dir} has features {feat_shape}, the others {tuple(shape)}")
        shape = shape or feat_shape
        shard_skipped = [records[lo + i].image_id for i in np.flatnonzero(~ok)]
        skipped += shard_skipped
        progress["done"][f"shard_{s:05d}.npy"] = {"count": hi - lo, "skipped": shard_skipped}
        write_json(progress_file, progress)  # after the shard: a kill in between recomputes it
    bar.close()
    if done_before:
        log(f"resumed: {done_before} of {len(records)} images were already cached in complete shards")
    if skipped:
        log(f"skipped {len(skipped)} of {len(records)} images in split {split!r} that could not be read "
            f"(features.skip_broken_images; their features are zeros): {skipped[:20]}")
    index = {"format": FORMAT, "backbone": backbone, "checkpoint": str(checkpoint), "fingerprint": fp,
             "split": split, "n_images": len(records), "tokens": int(shape[0]),
             "dim": int(shape[1]), "dtype": dtype, "jpeg_draft": jpeg_draft, "image_ids": [r.image_id for r in records],
             "shards": shards, "skipped_images": skipped,
             "seconds": round(time.time() - start_time, 2)}
    write_json(out_dir / "index.json", index)  # last: the index vouches for complete shards only
    return index


def _read_progress(path: Path) -> dict:
    try:
        progress = read_json(path)
    except (FileNotFoundError, ValueError):
        return {}
    if not isinstance(progress, dict) or not isinstance(progress.get("done"), dict):
        return {}  # written by an older version: recompute
    return progress


def _complete_shard_shape(path: Path, count: int, shape=None, dtype: str | None = None) -> tuple | None:
    """The per-image shape (T, D) of `path` if it is a complete .npy of `count` rows (and of the other
    shards' shape and dtype); None if it is missing, truncated or different."""
    try:
        arr = np.load(path, mmap_mode="r")
    except (OSError, ValueError, EOFError):  # missing, truncated, not an .npy
        return None
    ok = (arr.ndim == 3 and arr.shape[0] == count and (shape is None or tuple(arr.shape[1:]) == tuple(shape))
          and (dtype is None or arr.dtype == np.dtype(dtype)))
    return tuple(arr.shape[1:]) if ok else None


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of record indices that never straddle a shard, over the shards still to compute."""

    def __init__(self, todo: list[tuple[int, int, int]], batch_size: int):
        self.batches = [list(range(b, min(b + batch_size, hi)))
                        for _, lo, hi in todo for b in range(lo, hi, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


@torch.no_grad()
def _compute(evaluator, records, todo, split, shard_size, batch_size, num_workers, skip_broken, jpeg_draft,
             dtype, out_dir, device, bar):
    """Yield (shard, lo, hi, feature shape, ok mask) for each shard of `todo` once it is on disk.

    A shard is written into a temporary `.npy` memory map and renamed onto its final name when its
    last batch is in (io.atomic_path): a kill mid-shard leaves only a temporary nobody trusts.
    """
    if not todo:
        return
    ds = _Images(records, evaluator.preprocess, split, skip_broken, evaluator.image_size,
                 evaluator.image_size if jpeg_draft else None)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=_ShardBatches(todo, batch_size),
                                         num_workers=num_workers, pin_memory=str(device).startswith("cuda"))
    shard_of = {s: (lo, hi) for s, lo, hi in todo}
    current = None  # (shard, writer context, memmap, ok mask)
    try:
        for pixels, ok, idx in loader:
            s = int(idx[0]) // shard_size
            lo, hi = shard_of[s]
            pixels = pixels.to(device, non_blocking=True)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=str(device).startswith("cuda")):
                feats = evaluator.grid_features(pixels)
            feats = feats.to(torch.float32 if dtype == "float32" else torch.float16).cpu()
            feats[~ok] = 0  # a skipped image has zero features (not those of a blank picture), as documented
            if current is None:
                ctx = atomic_path(out_dir / f"shard_{s:05d}.npy")
                tmp = ctx.__enter__()
                arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=dtype, shape=(hi - lo, *feats.shape[1:]))
                current = (s, ctx, arr, np.zeros(hi - lo, bool))
            _, ctx, arr, oks = current
            rows = idx.numpy() - lo
            arr[rows] = feats.numpy()
            oks[rows] = ok.numpy()
            bar.update(len(pixels))
            if rows[-1] == hi - lo - 1:  # batches of a shard arrive in order: this was its last one
                arr.flush()
                shape = arr.shape[1:]
                del arr
                current = None
                ctx.__exit__(None, None, None)  # rename onto the final name
                yield s, lo, hi, shape, oks
    except BaseException as e:
        if current is not None:
            current[1].__exit__(type(e), e, e.__traceback__)  # removes the temporary
        raise


class FeatureStore:
    """Read access to a cached split: `store[idx]` -> float32 tensor [len(idx), T, D].

    Small splits (under `ram_limit_bytes`) are read into memory once; large ones (COCO: ~60 GB) are
    memory-mapped and only the rows of a batch are touched.
    """

    def __init__(self, index_json: str | Path, ram_limit_bytes: int = 4 << 30):
        index_json = Path(index_json)
        self.index = read_json(index_json)
        if self.index.get("format") != FORMAT:
            raise ValueError(f"{index_json}: not a feature index (expected format {FORMAT!r})")
        root = index_json.parent
        self.maps = [self._open(root / s["file"], s["count"], index_json) for s in self.index["shards"]]
        self.starts = np.array([s["start"] for s in self.index["shards"]])
        self.image_ids = self.index["image_ids"]
        nbytes = sum(m.nbytes for m in self.maps)
        if nbytes <= ram_limit_bytes:
            self.maps = [np.ascontiguousarray(m) for m in self.maps]

    def _open(self, path: Path, count: int, index_json: Path) -> np.ndarray:
        want = (count, self.index["tokens"], self.index["dim"])
        try:
            arr = np.load(path, mmap_mode="r")
        except FileNotFoundError:
            problem = "is missing"
        except (OSError, ValueError, EOFError) as e:
            problem = f"is truncated or not an .npy file ({e})"
        else:
            if arr.shape == want and arr.dtype == np.dtype(self.index["dtype"]):
                return arr
            problem = f"holds {arr.dtype} {tuple(arr.shape)}, the index says {self.index['dtype']} {want}"
        raise ValueError(f"{path} {problem}: the cached features of {index_json.parent} are damaged; delete "
                         f"{index_json} and rerun cache_features (complete shards are kept)")

    def __len__(self) -> int:
        return self.index["n_images"]

    @property
    def dim(self) -> int:
        return self.index["dim"]

    @property
    def backbone(self) -> str:
        return self.index["backbone"]

    def __getitem__(self, idx) -> torch.Tensor:
        idx = np.atleast_1d(np.asarray(idx))
        shard = np.searchsorted(self.starts, idx, side="right") - 1
        rows = [self.maps[s][i - self.starts[s]] for s, i in zip(shard, idx)]
        return torch.from_numpy(np.stack(rows).astype(np.float32))

    def describe(self) -> str:
        return json.dumps({k: self.index[k] for k in ("backbone", "split", "n_images", "tokens", "dim", "dtype")})

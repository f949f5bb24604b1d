"""Frozen grid features of the captioner's backbone, cached once per split.

The paper's captioner reads all 257 tokens (CLS + 16x16 patches) x 1024 of CLIP ViT-L/14 before the
final layer norm and projection (official models/vision_encoder_encoder; docs/fidelity.md row 1). The backbone is frozen, so the features are
computed once and stored as fp16 in memory-mappable `.npy` shards:

    results/features/<backbone>/<split>/shard_00000.npy   [n, T, D] float16
    results/features/<backbone>/<split>/index.json        written last: what the shards hold

Shards are written atomically and the index is written last, so a killed job resumes at the first
missing shard (a fingerprint of backbone checkpoint + image list guards against mixing shards of
different runs) and a reader never trusts half a split.

Scattered over several jobs (features.jobs: N > 1, e.g. one SLURM GPU job each): part k of N owns the
contiguous shard numbers `part_shards(n_shards, k, N)`, keeps its own `progress.part-k-of-N.json`
(resumable as above) and writes `part-k-of-N.json` when its shards are on disk; `gather_features`
then checks every shard (complete, one shape and dtype, the fingerprint of this image list) and writes
the same index.json as one job would, last. Shard numbering does not depend on N, so the shards of N
parts are the shards of one job, byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import numpy as np
import torch

from . import runtime
from .data import ImageRecord
from .images import PIPELINE_HINT, ImageFiles, collate
from .io import atomic_path, read_json, remove_stale_temporaries, write_json

FORMAT = "dico-features-v1"
PART_FORMAT = "dico-features-part-v1"


def fingerprint(checkpoint: str | Path, records: list[ImageRecord], shard_size: int, dtype: str) -> str:
    """Identifies what the shards of a split were computed from (not the image bytes: too slow)."""
    stat = Path(checkpoint).stat()
    h = hashlib.sha256()
    h.update(f"{Path(checkpoint).resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{shard_size}:{dtype}".encode())
    for r in records:
        h.update(f"{r.image_id}:{r.path}\n".encode())
    return h.hexdigest()[:16]


def shard_layout(n_images: int, shard_size: int) -> list[dict]:
    """The shards of a split: file name, first image and image count of each."""
    return [{"file": f"shard_{s:05d}.npy", "start": lo, "count": min(shard_size, n_images - lo)}
            for s, lo in enumerate(range(0, n_images, shard_size))]


def part_shards(n_shards: int, part: int, parts: int) -> range:
    """Shard numbers owned by part `part` of `parts`: contiguous, disjoint, covering all, sizes within one."""
    if not 0 <= part < parts:
        raise ValueError(f"part {part} does not exist: parts are numbered 0 .. {parts - 1}")
    return range(part * n_shards // parts, (part + 1) * n_shards // parts)


def part_marker(out_dir: str | Path, part: int, parts: int) -> Path:
    return Path(out_dir) / f"part-{part}-of-{parts}.json"


def cache_features(evaluator, backbone: str, checkpoint: str | Path, records: list[ImageRecord],
                   split: str, out_dir: str | Path, *, shard_size: int, batch_size: int,
                   dtype: str = "float16", num_workers: int = 0, skip_broken: bool = False,
                   jpeg_draft: bool = False, amp: str = "fp16", device: str = "cpu", log=print) -> dict:
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
    out_dir, fp = _prepare(records, split, out_dir, checkpoint, shard_size, dtype, jpeg_draft, amp)
    layout = shard_layout(len(records), shard_size)
    start_time = time.time()
    done = _cache_shards(evaluator, records, split, out_dir, range(len(layout)), out_dir / "progress.json", fp,
                         shard_size=shard_size, batch_size=batch_size, dtype=dtype, num_workers=num_workers,
                         skip_broken=skip_broken, jpeg_draft=jpeg_draft, amp=amp, device=device, log=log, owns_all=True)
    skipped = [i for s in done["shards"] for i in s["skipped"]]
    index = _index(backbone, checkpoint, fp, split, records, done["shape"], dtype, jpeg_draft, layout, skipped,
                   time.time() - start_time)
    write_json(out_dir / "index.json", index)  # last: the index vouches for complete shards only
    return index


def cache_features_part(evaluator, backbone: str, checkpoint: str | Path, records: list[ImageRecord],
                        split: str, out_dir: str | Path, part: int, parts: int, *, shard_size: int,
                        batch_size: int, dtype: str = "float16", num_workers: int = 0, skip_broken: bool = False,
                        jpeg_draft: bool = False, amp: str = "fp16", device: str = "cpu", log=print) -> dict:
    """Part `part` of `parts` of `cache_features`: the shards `part_shards` gives it, resumable through
    its own progress file, then its marker `part-<part>-of-<parts>.json` (what `gather_features` reads).

    A part that owns no shard (more parts than shards) writes its marker at once; `evaluator` may
    then be None, so such a job never loads the backbone."""
    out_dir, fp = _prepare(records, split, out_dir, checkpoint, shard_size, dtype, jpeg_draft, amp)
    marker = part_marker(out_dir, part, parts)
    marker.unlink(missing_ok=True)  # a marker from an earlier run must not vouch while its shards are redone
    layout = shard_layout(len(records), shard_size)
    owned = part_shards(len(layout), part, parts)
    start_time = time.time()
    done = _cache_shards(evaluator, records, split, out_dir, owned,
                         out_dir / f"progress.part-{part}-of-{parts}.json", fp, shard_size=shard_size,
                         batch_size=batch_size, dtype=dtype, num_workers=num_workers, skip_broken=skip_broken,
                         jpeg_draft=jpeg_draft, amp=amp, device=device, log=log, owns_all=False)
    info = {"format": PART_FORMAT, "backbone": backbone, "split": split, "part": part, "parts": parts,
            "fingerprint": fp, "dtype": dtype, "shape": list(done["shape"]) if done["shape"] else None,
            "shards": done["shards"], "seconds": round(time.time() - start_time, 2)}
    write_json(marker, info)  # last: the marker vouches for complete shards only
    return info


def gather_features(backbone: str, checkpoint: str | Path, records: list[ImageRecord], split: str,
                    out_dir: str | Path, parts: int, *, shard_size: int, dtype: str = "float16",
                    jpeg_draft: bool = False, amp: str = "fp16") -> dict:
    """Check the shards of all `parts` part jobs and write index.json (the same as one job's, plus
    `jobs`). Fails, naming the shard or part and the fix, if any part is missing, stale or damaged."""
    out_dir = Path(out_dir)
    (out_dir / "index.json").unlink(missing_ok=True)
    fp = fingerprint(checkpoint, records, shard_size, _settings(dtype, jpeg_draft, amp))
    layout = shard_layout(len(records), shard_size)
    shape, skipped, seconds = None, [], 0.0
    for part in range(parts):
        marker = part_marker(out_dir, part, parts)
        redo = (f"delete {marker} and rerun its cache_features job (snakemake does it; by hand: `dico "
                f"cache-features ... --part {part} --parts {parts}`): the part recomputes only missing or "
                "damaged shards")
        try:
            info = read_json(marker)
        except FileNotFoundError:
            raise FileNotFoundError(f"{marker} is missing: part {part} of {parts} of the features of split "
                                    f"{split!r} has not finished; run its cache_features job (by hand: `dico "
                                    f"cache-features ... --part {part} --parts {parts}`)") from None
        if not isinstance(info, dict) or info.get("format") != PART_FORMAT:
            raise ValueError(f"{marker}: not a feature part marker (format {PART_FORMAT!r}); {redo}")
        if info.get("fingerprint") != fp:
            raise ValueError(f"{marker}: part {part} was cached from a different backbone checkpoint, image "
                             f"list or features settings (fingerprint {info.get('fingerprint')}, expected {fp}); "
                             f"{redo}")
        want = [layout[s] for s in part_shards(len(layout), part, parts)]
        got = [{k: s.get(k) for k in ("file", "start", "count")} for s in info.get("shards", [])]
        if got != want:
            raise ValueError(f"{marker}: lists shards {[s['file'] for s in got]}, part {part} of {parts} owns "
                             f"{[s['file'] for s in want]}; {redo}")
        for s in info["shards"]:
            problem = _shard_problem(out_dir / s["file"], s["count"], shape, dtype)
            if problem:
                raise ValueError(f"{out_dir / s['file']} (part {part} of {parts}) {problem}; {redo}")
            shape = shape or tuple(np.load(out_dir / s["file"], mmap_mode="r").shape[1:])
            skipped += s["skipped"]
        seconds += info.get("seconds", 0.0)
    index = _index(backbone, checkpoint, fp, split, records, shape, dtype, jpeg_draft, layout, skipped, seconds)
    index["jobs"] = parts
    write_json(out_dir / "index.json", index)  # last: the index vouches for complete shards only
    return index


def _settings(dtype: str, jpeg_draft: bool, amp: str) -> str:
    """The feature settings a fingerprint covers: storage dtype, JPEG draft decoding, and the autocast
    of the backbone on a GPU when it is not fp16 (the official precision; CPU always runs fp32)."""
    return dtype + (":draft" if jpeg_draft else "") + (f":amp-{amp}" if amp != "fp16" else "")


def _prepare(records, split, out_dir, checkpoint, shard_size, dtype, jpeg_draft, amp) -> tuple[Path, str]:
    if not records:
        raise ValueError(f"split {split!r} has no images: nothing to cache features of")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # an index from an earlier run must not describe the shards while they are being replaced
    (out_dir / "index.json").unlink(missing_ok=True)
    remove_stale_temporaries(out_dir)  # of dead processes of this host only: parallel parts are left alone
    return out_dir, fingerprint(checkpoint, records, shard_size, _settings(dtype, jpeg_draft, amp))


def _index(backbone, checkpoint, fp, split, records, shape, dtype, jpeg_draft, layout, skipped, seconds) -> dict:
    return {"format": FORMAT, "backbone": backbone, "checkpoint": str(checkpoint), "fingerprint": fp,
            "split": split, "n_images": len(records), "tokens": int(shape[0]),
            "dim": int(shape[1]), "dtype": dtype, "jpeg_draft": jpeg_draft, "image_ids": [r.image_id for r in records],
            "shards": layout, "skipped_images": skipped, "seconds": round(seconds, 2)}


def _cache_shards(evaluator, records, split, out_dir: Path, owned: range, progress_file: Path, fp: str, *,
                  shard_size, batch_size, dtype, num_workers, skip_broken, jpeg_draft, amp, device, log,
                  owns_all: bool) -> dict:
    """Compute the shards `owned` that `progress_file` does not list as complete.

    Returns {"shape": (T, D) or None when no shard is owned, "shards": [{"file", "start", "count",
    "skipped"}] in order}. On a fingerprint change the owned shards are recomputed (`owns_all`: every
    shard file of the folder is deleted, as the single job always did)."""
    from tqdm import tqdm

    progress = _read_progress(progress_file)
    if progress.get("fingerprint") != fp:
        stale = list(out_dir.glob("shard_*.npy")) if owns_all else [
            p for s in owned if (p := out_dir / f"shard_{s:05d}.npy").exists()]
        if progress_file.exists() or stale:
            log(f"{out_dir}: shards from a different backbone/image list/settings; recomputing them")
        for old in stale:
            old.unlink()
        progress = {"fingerprint": fp, "done": {}}
        write_json(progress_file, progress)

    layout = shard_layout(len(records), shard_size)
    todo, shape, done_before, owned_images = [], None, 0, 0
    for s in owned:
        lo, count = layout[s]["start"], layout[s]["count"]
        owned_images += count
        path = out_dir / layout[s]["file"]
        done = progress["done"].get(path.name)
        found = _complete_shard_shape(path, count, shape, dtype) if done is not None else None
        if found is not None:
            shape = found
            done_before += count
        else:
            todo.append((s, lo, lo + count))

    bar = tqdm(total=owned_images, initial=done_before, desc=f"features {split}", unit="img", mininterval=2.0)
    for s, lo, hi, feat_shape, ok in _compute(evaluator, records, todo, split, shard_size, batch_size, num_workers,
                                              skip_broken, jpeg_draft, dtype, amp, out_dir, device, bar):
        if not ok.any() and hi - lo > 1:
            raise ValueError(f"none of the {hi - lo} images {records[lo].path} ... {records[hi - 1].path} "
                             f"(split {split!r}) could be read; check data.image_root in the config "
                             "(features.skip_broken_images only covers a few broken files)")
        if shape is not None and tuple(feat_shape) != tuple(shape):
            raise RuntimeError(f"shard {s} of {out_dir} has features {feat_shape}, the others {tuple(shape)}")
        shape = shape or feat_shape
        progress["done"][f"shard_{s:05d}.npy"] = {"count": hi - lo,
                                                  "skipped": [records[lo + i].image_id for i in np.flatnonzero(~ok)]}
        write_json(progress_file, progress)  # after the shard: a kill in between recomputes it
    bar.close()
    shards = [{**layout[s], "skipped": progress["done"][layout[s]["file"]]["skipped"]} for s in owned]
    skipped = [i for s in shards for i in s["skipped"]]
    if done_before:
        log(f"resumed: {done_before} of {owned_images} images were already cached in complete shards")
    if skipped:
        log(f"skipped {len(skipped)} of {owned_images} images in split {split!r} that could not be read "
            f"(features.skip_broken_images; their features are zeros): {skipped[:20]}")
    return {"shape": tuple(shape) if shape is not None else None, "shards": shards}


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


def _shard_problem(path: Path, count: int, shape=None, dtype: str | None = None) -> str | None:
    """What is wrong with shard `path` (None: a complete .npy of `count` rows of `shape` and `dtype`)."""
    if _complete_shard_shape(path, count, shape, dtype) is not None:
        return None
    try:
        arr = np.load(path, mmap_mode="r")
    except FileNotFoundError:
        return "is missing"
    except (OSError, ValueError, EOFError) as e:
        return f"is truncated or not an .npy file ({e})"
    want = f"{dtype} ({count}, {', '.join(map(str, shape)) if shape else 'T, D'})"
    return f"holds {arr.dtype} {tuple(arr.shape)}, expected {want}"


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of record indices that never straddle a shard, over the shards still to compute."""

    def __init__(self, todo: list[tuple[int, int, int]], batch_size: int):
        self.batches = [list(range(b, min(b + batch_size, hi)))
                        for _, lo, hi in todo for b in range(lo, hi, batch_size)]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def image_loader(evaluator, paths, batch_sampler, *, split: str | None = None, num_workers: int = 0,
                 jpeg_draft: bool = False, device: str = "cpu", hint: str = PIPELINE_HINT):
    """Batches of `paths` (the index lists of `batch_sampler`) decoded and preprocessed for the backbone
    `evaluator` (`dico.images.collate` items), as feature caching reads them."""
    ds = ImageFiles(paths, evaluator.preprocess, evaluator.image_size, split,
                    evaluator.image_size if jpeg_draft else None, hint)
    return torch.utils.data.DataLoader(ds, batch_sampler=batch_sampler, collate_fn=collate, num_workers=num_workers,
                                       pin_memory=str(device).startswith("cuda"))


@torch.no_grad()
def grid_batch(evaluator, pixels: torch.Tensor, ok: torch.Tensor, *, dtype: str, amp: str, device: str) -> torch.Tensor:
    """The grid features of a batch as `cache_features` stores them (on the CPU, in the storage dtype):
    what a captioner trained on cached features reads, bit for bit, once cast back to float32."""
    pixels = pixels.to(device, non_blocking=True)
    # features.amp: the frozen backbone's precision on a GPU (official: the whole model in fp16)
    with runtime.autocast(device, amp):
        feats = evaluator.grid_features(pixels)
    feats = feats.to(torch.float32 if dtype == "float32" else torch.float16).cpu()
    feats[~ok] = 0  # a skipped image has zero features (not those of a blank picture), as documented
    return feats


@torch.no_grad()
def _compute(evaluator, records, todo, split, shard_size, batch_size, num_workers, skip_broken, jpeg_draft,
             dtype, amp, out_dir, device, bar):
    """Yield (shard, lo, hi, feature shape, ok mask) for each shard of `todo` once it is on disk.

    A shard is written into a temporary `.npy` memory map and renamed onto its final name when its
    last batch is in (io.atomic_path): a kill mid-shard leaves only a temporary nobody trusts.
    """
    if not todo:
        return
    loader = image_loader(evaluator, [r.path for r in records], _ShardBatches(todo, batch_size), split=split,
                          num_workers=num_workers, jpeg_draft=jpeg_draft, device=device)
    shard_of = {s: (lo, hi) for s, lo, hi in todo}
    current = None  # (shard, writer context, memmap, ok mask)
    try:
        for pixels, ok, idx, errors in loader:
            if not (skip_broken or ok.all()):
                raise next(e for e in errors if e is not None)
            s = int(idx[0]) // shard_size
            lo, hi = shard_of[s]
            feats = grid_batch(evaluator, pixels, ok, dtype=dtype, amp=amp, device=device)
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

    @property
    def grid(self) -> dict:
        """What a captioner trained on these features records of them (`dico.checkpoint`)."""
        return {"name": self.backbone, "dim": self.dim, "tokens": self.index["tokens"]}

    def describe(self) -> str:
        return json.dumps({k: self.index[k] for k in ("backbone", "split", "n_images", "tokens", "dim", "dtype")})


def aligned_store(index_json, records: list[ImageRecord], split: str) -> FeatureStore:
    """The features of a split, checked to be those of `records`, in their order."""
    store = FeatureStore(index_json)
    if store.image_ids != [r.image_id for r in records]:
        raise ValueError(f"{index_json}: features of split {split!r} do not match the split file's images "
                         "(different data or order); rerun cache_features")
    return store


def usable_rows(store: FeatureStore, records: list[ImageRecord]) -> list[int]:
    """Rows of the records whose images were read (features.skip_broken_images leaves the others out)."""
    skipped = set(store.index.get("skipped_images", []))
    return [i for i, r in enumerate(records) if r.image_id not in skipped]

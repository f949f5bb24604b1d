"""Image embeddings of a CLIP model: computed from image files, and the file `cache_embeddings` writes.

`embed_images` is the one path from image files to L2-normalised embeddings, used by the pipeline's
`cache_embeddings` (scorers and reward models embed every split once), by `dico evaluate` outside the
pipeline and by `dico score`. An embeddings file holds
`{"model", "split", "image_ids", "skipped_images", "embeddings": [N, D]}` (fp16 when computed on a GPU).
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from .images import ImageFiles, collate
from .io import Outputs


@torch.no_grad()
def embed_images(evaluator, paths: list, *, batch_size: int = 64, device: str = "cpu", workers: int = 0,
                 split: str | None = None, skip_broken: bool = False, broken_hint: str | None = None,
                 progress: bool = True, log=None) -> torch.Tensor:
    """L2-normalised image embeddings [N, D] (fp32, on the CPU), decoded with the evaluator's own
    preprocessing by `workers` processes (decoding, not the model, bounds CLIP scoring on a GPU).

    An image that cannot be read raises, naming the file (and `split`) and what to do (`broken_hint`,
    the command's own option; by default the pipeline's features.skip_broken_images), unless
    `skip_broken`: then its row is NaN, so no score can silently use it; `skipped_rows` lists such rows.
    """
    from tqdm import tqdm

    if not paths:
        raise ValueError("no images to embed" + (f" (split {split!r} is empty)" if split else ""))
    hint = {"hint": broken_hint} if broken_hint else {}
    loader = torch.utils.data.DataLoader(ImageFiles(paths, evaluator.preprocess, evaluator.image_size, split, **hint),
                                         batch_size=batch_size, num_workers=workers, collate_fn=collate,
                                         pin_memory=str(device).startswith("cuda"))
    out, broken = [], []
    for pixels, ok, idx, errors in tqdm(loader, desc="image embeddings", unit="batch", disable=not progress,
                                        mininterval=2.0):
        if not ok.all():
            error = next(e for e in errors if e is not None)
            if not skip_broken:
                raise error
            broken += idx[~ok].tolist()
        embs = torch.full((len(idx), int(evaluator.embed_dim)), float("nan"))
        if ok.any():
            embs[ok] = evaluator.embed_images(pixels[ok].to(device), batch_size).float().cpu()
        out.append(embs)
    if broken:
        if len(broken) == len(paths) and len(paths) > 1:
            raise ValueError(f"none of the {len(paths)} images (e.g. {paths[0]}) could be read; check "
                             "data.image_root (or --images)")
        (log or print)(f"skipped {len(broken)} of {len(paths)} images that could not be read "
                       f"(features.skip_broken_images): {[str(paths[i]) for i in broken[:10]]}")
    return torch.cat(out)


def skipped_rows(image_embs: torch.Tensor) -> list[int]:
    """Rows of an embedding matrix that `embed_images(skip_broken=True)` left NaN."""
    return torch.isnan(image_embs.float()).any(dim=-1).nonzero().flatten().tolist()


def cache_embeddings(evaluator, name: str, jobs: list[tuple[str, list, str]], *, device: str,
                     skip_broken: bool = False, log=print) -> None:
    """The `cache_embeddings` step: for each (split, records, out), embed the images of the split's
    `records` with the clip_models entry `name` and write the embeddings file `out`: every file or none."""
    with Outputs() as files:
        for split, records, out in jobs:
            t0 = time.time()
            embs = embed_images(evaluator, [r.path for r in records], device=device, split=split,
                                skip_broken=skip_broken, log=log)
            torch.save({"model": name, "split": split, "image_ids": [r.image_id for r in records],
                        "skipped_images": [records[i].image_id for i in skipped_rows(embs)],
                        "embeddings": embs.half() if device.startswith("cuda") else embs}, files.path(out))
            log(f"image embeddings {name}/{split}: {tuple(embs.shape)} in {time.time() - t0:.1f}s")


def load_embeddings(path: str | Path, records=None) -> torch.Tensor:
    """The embeddings [N, D] (fp32) of a `cache_embeddings` file; with `records`, checked to be theirs, in order."""
    try:
        blob = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: image embeddings not found; run cache_embeddings first") from None
    except Exception as e:  # truncated zip, not a torch file, ...
        raise ValueError(f"{path} is not a readable embeddings file ({type(e).__name__}: {str(e)[:200]}); "
                         "delete it and rerun cache_embeddings") from None
    if not isinstance(blob, dict) or not {"image_ids", "embeddings"} <= set(blob):
        raise ValueError(f"{path}: not an image-embeddings file of `dico cache-embeddings`")
    if records is not None and blob["image_ids"] != [r.image_id for r in records]:
        raise ValueError(f"{path}: image embeddings do not match the split's images; rerun cache_embeddings")
    return blob["embeddings"].float()

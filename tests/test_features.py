"""Feature caching: shards equal to a direct forward pass of each image, whatever the batching,
workers and shard boundaries; JPEG draft decoding is opt-in and recorded."""
import json

import numpy as np
import pytest
import torch

from dico.data import load_split
from dico.images import load_image
from dico.features import FeatureStore, cache_features
from worlds import tiny_world


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    ev = tiny_world(root, n_train=23, n_val=4, n_test=4, image_size=96, seed=3)
    records = load_split(root / "splits.json", "train")
    with torch.no_grad():  # the reference: one image at a time, full decode, float32
        direct = torch.cat([ev.grid_features(ev.preprocess(load_image(r.path))[None]) for r in records]).numpy()
    return root, ev, records, direct


@pytest.mark.parametrize("shard_size,batch_size,workers", [(10, 4, 0), (10, 4, 2), (23, 5, 2), (5, 16, 1)])
def test_shards_hold_each_images_features_in_order(world, tmp_path, shard_size, batch_size, workers):
    root, ev, records, direct = world
    index = cache_features(ev, "clip", root / "clip.pt", records, "train", tmp_path, shard_size=shard_size,
                           batch_size=batch_size, num_workers=workers, dtype="float32", log=lambda *a: None)
    n_shards = -(-len(records) // shard_size)
    assert [s["count"] for s in index["shards"]] == [min(shard_size, len(records) - i * shard_size)
                                                    for i in range(n_shards)]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporaries left
    got = FeatureStore(tmp_path / "index.json")[np.arange(len(records))].numpy()
    np.testing.assert_allclose(got, direct, atol=1e-5)
    assert index["image_ids"] == [r.image_id for r in records] and index["jpeg_draft"] is False


def test_fp16_shards_are_the_rounded_features(world, tmp_path):
    root, ev, records, direct = world
    cache_features(ev, "clip", root / "clip.pt", records, "train", tmp_path, shard_size=8, batch_size=3,
                   log=lambda *a: None)
    arr = np.load(tmp_path / "shard_00001.npy")
    assert arr.dtype == np.float16
    np.testing.assert_allclose(arr.astype(np.float32), direct[8:16], rtol=2e-3, atol=2e-3)


def test_jpeg_draft_is_opt_in_close_to_the_full_decode_and_recomputes_on_change(world, tmp_path):
    root, ev, records, direct = world
    lines = []
    cache_features(ev, "clip", root / "clip.pt", records, "train", tmp_path, shard_size=10, batch_size=4,
                   dtype="float32", log=lines.append)
    full = FeatureStore(tmp_path / "index.json")[np.arange(len(records))].numpy()
    index = cache_features(ev, "clip", root / "clip.pt", records, "train", tmp_path, shard_size=10,
                           batch_size=4, dtype="float32", jpeg_draft=True, log=lines.append)
    assert index["jpeg_draft"] is True
    assert any("different backbone/image list/settings" in line for line in lines)  # not mixed with the full decode
    draft = FeatureStore(tmp_path / "index.json")[np.arange(len(records))].numpy()
    # the 96-px demo JPEGs decode at 1/2 scale (48 px >= the model's 32): different pixels, close features
    assert not np.allclose(draft, full, atol=1e-5)
    assert np.abs(draft - full).mean() / np.abs(full).mean() < 0.2


def test_draft_decoding_keeps_the_short_side_at_least_the_requested_size(world):
    root, ev, records, _ = world
    assert load_image(records[0].path).size == (96, 96)
    assert load_image(records[0].path, draft_size=32).size == (48, 48)
    assert load_image(records[0].path, draft_size=60).size == (96, 96)


# -- features.jobs: N part jobs + a gather --------------------------------------------------------
from dico.features import cache_features_part, gather_features, part_marker, part_shards  # noqa: E402

PART_KW = dict(shard_size=10, batch_size=4, dtype="float32", log=lambda *a: None)


def _one_job(world, out):
    root, ev, records, _ = world
    return cache_features(ev, "clip", root / "clip.pt", records, "train", out, **PART_KW)


def _parts(world, out, parts, which=None):
    root, ev, records, _ = world
    for k in (range(parts) if which is None else which):
        cache_features_part(ev, "clip", root / "clip.pt", records, "train", out, k, parts, **PART_KW)


def _gather(world, out, parts):
    root, _, records, _ = world
    return gather_features("clip", root / "clip.pt", records, "train", out, parts, shard_size=10, dtype="float32")


def test_part_shards_are_contiguous_disjoint_and_cover_every_shard():
    for n_shards in range(0, 13):
        for parts in range(1, 8):
            ranges = [part_shards(n_shards, k, parts) for k in range(parts)]
            assert [s for r in ranges for s in r] == list(range(n_shards)), (n_shards, parts)
            sizes = [len(r) for r in ranges]
            assert max(sizes) - min(sizes) <= 1, (n_shards, parts, sizes)
    with pytest.raises(ValueError, match="parts are numbered 0 .. 1"):
        part_shards(4, 2, 2)


@pytest.mark.parametrize("parts", [2, 4])  # 23 images in 3 shards: with 4 parts one part owns none
def test_part_jobs_and_gather_equal_one_job_bit_for_bit(world, tmp_path, parts):
    root, ev, records, direct = world
    one = _one_job(world, tmp_path / "one")
    _parts(world, tmp_path / "parts", parts, which=reversed(range(parts)))  # any order
    gathered = _gather(world, tmp_path / "parts", parts)
    for shard in one["shards"]:
        assert (tmp_path / "one" / shard["file"]).read_bytes() == (tmp_path / "parts" / shard["file"]).read_bytes()
    assert gathered.pop("jobs") == parts
    assert {k: v for k, v in gathered.items() if k != "seconds"} == {k: v for k, v in one.items() if k != "seconds"}
    got = FeatureStore(tmp_path / "parts" / "index.json")[np.arange(len(records))].numpy()
    np.testing.assert_allclose(got, direct, atol=1e-5)  # and against the one-image-at-a-time reference


def test_an_empty_part_needs_no_backbone(world, tmp_path):
    root, _, records, _ = world
    info = cache_features_part(None, "clip", root / "clip.pt", records, "train", tmp_path, 0, 4, **PART_KW)
    assert info["shards"] == [] and part_marker(tmp_path, 0, 4).exists()


def test_gather_names_the_missing_part_or_damaged_shard_and_the_fix(world, tmp_path):
    root, ev, records, _ = world
    out = tmp_path / "f"
    _parts(world, out, 2, which=[0])
    with pytest.raises(FileNotFoundError, match=r"part-1-of-2.json is missing: part 1 of 2 .* --part 1 --parts 2"):
        _gather(world, out, 2)
    _parts(world, out, 2, which=[1])
    shard = out / "shard_00002.npy"  # owned by part 1
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    with pytest.raises(ValueError, match=r"shard_00002.npy \(part 1 of 2\) is truncated .* delete .*part-1-of-2.json "
                                         r"and rerun its cache_features job"):
        _gather(world, out, 2)
    assert not (out / "index.json").exists()
    (out / "shard_00002.npy").unlink()
    with pytest.raises(ValueError, match=r"shard_00002.npy \(part 1 of 2\) is missing"):
        _gather(world, out, 2)
    # the fix the message gives: the part reruns and recomputes only its damaged shard
    stamp = (out / "shard_00001.npy").stat().st_mtime_ns
    lines = []
    cache_features_part(ev, "clip", root / "clip.pt", records, "train", out, 1, 2,
                        **{**PART_KW, "log": lines.append})
    assert "resumed: 10 of 13 images were already cached in complete shards" in lines
    assert (out / "shard_00001.npy").stat().st_mtime_ns == stamp
    _gather(world, out, 2)
    # a part cached from another image list (here: a different shard size) is refused, not mixed in
    cache_features_part(ev, "clip", root / "clip.pt", records, "train", out, 0, 2, **{**PART_KW, "shard_size": 12})
    with pytest.raises(ValueError, match=r"part-0-of-2.json: part 0 was cached from a different .*\(fingerprint"):
        _gather(world, out, 2)


SLOW_PART = """
import sys, time
from dico.data import load_split
from dico.clip_weights import load_evaluator
from dico.features import cache_features_part

root, out = sys.argv[1], sys.argv[2]
ev = load_evaluator(f"{root}/clip.pt")
fast = ev.grid_features
ev.grid_features = lambda pixels: (time.sleep(0.3), fast(pixels))[1]
cache_features_part(ev, "clip", f"{root}/clip.pt", load_split(f"{root}/splits.json", "train"), "train", out, 1, 2,
                    shard_size=4, batch_size=2, dtype="float32")
"""


def test_a_killed_part_resumes_and_leaves_the_other_part_alone(world, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    root, ev, records, direct = world
    kw = {**PART_KW, "shard_size": 4, "batch_size": 2}
    out = tmp_path / "f"
    for k in (0, 1):  # shards 0-2 and 3-5
        cache_features_part(ev, "clip", root / "clip.pt", records, "train", out, k, 2, **kw)
    before = {f"shard_{s:05d}.npy": (out / f"shard_{s:05d}.npy").stat().st_mtime_ns for s in range(3)}
    for s in (4, 5):  # part 1 must redo two shards (a disk that lost them): its old marker must not vouch
        (out / f"shard_{s:05d}.npy").unlink()
    script = tmp_path / "slow_part.py"
    script.write_text(SLOW_PART)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out)], stderr=subprocess.PIPE,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    deadline = time.time() + 120
    while not (out / "shard_00004.npy").exists():  # kill it once it has redone one of the two
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()[-2000:]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not part_marker(out, 1, 2).exists()  # nothing vouches for the killed part
    with pytest.raises(FileNotFoundError, match="part-1-of-2.json is missing"):
        gather_features("clip", root / "clip.pt", records, "train", out, 2, shard_size=4, dtype="float32")
    lines = []
    cache_features_part(ev, "clip", root / "clip.pt", records, "train", out, 1, 2, **{**kw, "log": lines.append})
    assert "resumed: 8 of 11 images were already cached in complete shards" in lines
    assert all((out / name).stat().st_mtime_ns == t for name, t in before.items())  # part 0 untouched
    index = gather_features("clip", root / "clip.pt", records, "train", out, 2, shard_size=4, dtype="float32")
    assert index["n_images"] == 23 and len(index["shards"]) == 6
    np.testing.assert_allclose(FeatureStore(out / "index.json")[np.arange(23)].numpy(), direct, atol=1e-5)


def test_cli_parts_and_gather_write_the_one_job_index_and_empty_parts_load_no_model(world, tmp_path):
    from dico.cli import main

    root, _, records, _ = world
    spec = {"backbone": "clip", "shard_size": 10, "batch_size": 4, "dtype": "float32", "num_workers": 0,
            "skip_broken_images": False, "jpeg_draft": False, "amp": "fp16",
            "model": {"name": "clip", "device": "cpu", "path": str(root / "clip.pt"), "format": "openai", "arch": None}}
    base = ["cache-features", "--spec-json", json.dumps(spec), "--splits", str(root / "splits.json"), "--split", "train"]
    assert main(base + ["--out-dir", str(tmp_path / "one")]) == 0
    for k in range(4):  # 3 shards over 4 jobs: part 0 owns none
        assert main(base + ["--out-dir", str(tmp_path / "parts"), "--part", str(k), "--parts", "4"]) == 0
    assert main(base + ["--out-dir", str(tmp_path / "parts"), "--gather", "4"]) == 0
    one, parts = (json.loads((tmp_path / d / "index.json").read_text()) for d in ("one", "parts"))
    assert parts.pop("jobs") == 4 and {**one, "seconds": 0} == {**parts, "seconds": 0}
    # the empty part never opens the backbone: a checkpoint that cannot be loaded does not matter to it
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    bad = dict(spec, model={**spec["model"], "path": str(broken)})
    empty = ["cache-features", "--spec-json", json.dumps(bad), "--splits", str(root / "splits.json"), "--split", "train",
             "--out-dir", str(tmp_path / "empty"), "--part", "0", "--parts", "4"]
    assert main(empty) == 0 and part_marker(tmp_path / "empty", 0, 4).exists()
    assert main(empty[:-4] + ["--part", "1", "--parts", "4"]) != 0  # a part with shards does load it

"""Feature caching: shards equal to a direct forward pass of each image, whatever the batching,
workers and shard boundaries; JPEG draft decoding is opt-in and recorded."""
import numpy as np
import pytest
import torch

from dico.data import load_image, load_split
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

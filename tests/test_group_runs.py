"""evaluate.group_runs: one `dico generate` / `dico evaluate` process for several runs, and one
`dico cache-embeddings` process for several splits, write what one process per run (per split)
writes. The reference is the per-run command itself, run separately on the same inputs."""
import json

import pytest
import torch

from dico import cli
from dico import config as C
from worlds import TINY_CONFIG

# the tiny worlds' config, scored on val and test, XE a little shorter
CONFIG = C.deep_merge(TINY_CONFIG, {"xe": {"steps": 20, "val_every": 20},
                                    "evaluate": {"splits": ["val", "test"]}})
SPLITS = ("val", "test")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Demo images, features of a random tiny CLIP and two XE captioners (seeds 0 and 1)."""
    from worlds import make_world

    return make_world(tmp_path_factory.mktemp("group"), n_train=24, n_val=6, n_test=6, seed=3,
                      features=("train", *SPLITS), config=CONFIG, xe_runs=("xe", "xe_seed1"),
                      xe_config={**CONFIG, "seeds": [0, 1]})["root"]


def _generate(root, models, outs):
    return cli.main(["generate", "--config", str(root / "config.yaml"), "--model", *map(str, models),
                     "--splits", str(root / "splits.json"), "--split", *SPLITS,
                     "--features", *(str(root / "features" / s / "index.json") for s in SPLITS),
                     "--out", *map(str, outs)])


def _evaluate(root, runs, captions, outs):
    return cli.main(["evaluate", "--config", str(root / "config.yaml"), "--splits", str(root / "splits.json"),
                     "--split", *SPLITS, "--clip-model", f"clip={root / 'clip.pt'}", "--run", *runs,
                     "--model-checkpoint", *(str(root / r / "model.pt") for r in runs),
                     "--captions", *map(str, captions), "--out", *map(str, outs)])


def test_one_generate_and_one_evaluate_for_two_runs_equal_one_per_run(world, tmp_path):
    runs = ["xe", "xe_seed1"]
    for r in runs:  # the reference: one process per run
        assert _generate(world, [world / r / "model.pt"], [tmp_path / f"one_{r}_{s}.json" for s in SPLITS]) == 0
    assert _generate(world, [world / r / "model.pt" for r in runs],
                     [tmp_path / f"all_{r}_{s}.json" for r in runs for s in SPLITS]) == 0  # run-major
    for r in runs:
        for s in SPLITS:
            assert (tmp_path / f"all_{r}_{s}.json").read_text() == (tmp_path / f"one_{r}_{s}.json").read_text()
    caps = {(r, s): json.loads((tmp_path / f"one_{r}_{s}.json").read_text()) for r in runs for s in SPLITS}
    assert caps[("xe", "test")] != caps[("xe_seed1", "test")]  # two models: an order mix-up would show

    for r in runs:
        assert _evaluate(world, [r], [tmp_path / f"one_{r}_{s}.json" for s in SPLITS],
                         [tmp_path / f"m_one_{r}_{s}.json" for s in SPLITS]) == 0
    assert _evaluate(world, runs, [tmp_path / f"one_{r}_{s}.json" for r in runs for s in SPLITS],
                     [tmp_path / f"m_all_{r}_{s}.json" for r in runs for s in SPLITS]) == 0
    for r in runs:
        for s in SPLITS:
            one = json.loads((tmp_path / f"m_one_{r}_{s}.json").read_text())
            grouped = json.loads((tmp_path / f"m_all_{r}_{s}.json").read_text())
            assert grouped["run"] == r and grouped["split"] == s
            assert grouped["metrics"] == one["metrics"] and grouped["diversity"] == one["diversity"]
            assert grouped["provenance"]["run_provenance"]["checkpoint"] == str(world / r / "model.pt")
            assert grouped["provenance"]["seed"] == {"xe": 0, "xe_seed1": 1}[r]


def test_counts_that_do_not_match_name_the_flags(world, tmp_path, capsys):
    with pytest.raises(SystemExit, match=r"--out per run and split \(2 runs x 2 splits\): expected 4, got 2"):
        _generate(world, [world / "xe" / "model.pt", world / "xe_seed1" / "model.pt"],
                  [tmp_path / "a.json", tmp_path / "b.json"])
    with pytest.raises(SystemExit, match=r"one --model-checkpoint per --run \(2 runs, 1 --model-checkpoint\)"):
        cli.main(["evaluate", "--config", str(world / "config.yaml"), "--splits", str(world / "splits.json"),
                  "--split", "test", "--run", "a", "b", "--model-checkpoint", "x.pt", "--captions", "c1", "c2",
                  "--out", "o1", "o2"])


def test_cache_embeddings_of_several_splits_in_one_process_equal_one_per_split(world, tmp_path):
    base = ["cache-embeddings", "--config", str(world / "config.yaml"), "--name", "clip", "--splits",
            str(world / "splits.json"), "--checkpoint", str(world / "clip.pt")]
    for s in SPLITS:
        assert cli.main([*base, "--split", s, "--out", str(tmp_path / f"one_{s}.pt")]) == 0
    assert cli.main([*base, "--split", *SPLITS, "--out", *(str(tmp_path / f"all_{s}.pt") for s in SPLITS)]) == 0
    for s in SPLITS:
        one, grouped = (torch.load(tmp_path / f"{k}_{s}.pt", weights_only=False) for k in ("one", "all"))
        assert grouped["split"] == s and grouped["image_ids"] == one["image_ids"]
        assert torch.equal(grouped["embeddings"], one["embeddings"])

"""TensorBoard curves of training runs (dico.run_events), read back with TensorBoard's own readers: the
app's EventAccumulator and the raw event-file loader (what `wandb sync` and the fast data server see:
every event of every file, nothing purged). They equal train_log.jsonl, also after a crash and a resume."""
import json

import numpy as np
import pytest
import torch

from dico import config as C
from dico import runtime
from dico import train as T
from dico.demo import grammar_of
from worlds import TINY_CONFIG, make_world

CONFIG = C.deep_merge(TINY_CONFIG, {
    "train": {"log_every": 1},
    "xe": {"steps": 12, "batch_size": 24, "val_every": 4},
    "dico": {"steps": 4, "val_every": 2, "batch_images": 4, "k": 2, "lr": 1e-4}})


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("events"), n_train=24, n_val=6, n_test=6, seed=3,
                      features=("train", "val"), embeddings=("train", "val"))


def _xe(world, out, config=CONFIG):
    spec = C.run_spec(C.validate(C.deep_merge(config, {})), "xe")
    runtime.configure(spec["seed"], True)
    T.train_xe(spec, world["splits"], world["features"], out / "work", out / "model.pt", out / "log.jsonl",
               device="cpu", log=lambda *a: None, grammar=grammar_of(world["splits"]))
    return out


def _log_points(out, log_name="log.jsonl") -> list:
    """The log written down as curves, independently of dico.run_events: each number of a row (not its
    step, not a boolean, not None) at the row's step under "<phase>/<key>", rounded to the 32-bit float
    TensorBoard stores (its fast loader drops 64-bit scalars); each example caption as text."""
    points = []
    for row in map(json.loads, (out / log_name).read_text().splitlines()):
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
                points.append((f"{row['phase']}/{key}", row["step"], float(np.float32(value))))
            elif key == "example":
                points.append((f"{row['phase']}/example/text_summary", row["step"], value))
    return sorted(points, key=str)


def _value(tensor_proto):
    from tensorboard.util import tensor_util

    array = tensor_util.make_ndarray(tensor_proto)
    if array.dtype == object:
        return array.item().decode()
    assert array.dtype == np.float32, array.dtype  # 64-bit scalars: TensorBoard's fast loader shows none
    return float(array.item())


def _accumulated(out) -> list:
    """What the TensorBoard app loads: (tag, step, value) of every tensor summary, none sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    return sorted(((tag, e.step, _value(e.tensor_proto)) for tag in acc.Tags()["tensors"] for e in acc.Tensors(tag)),
                  key=str)


def _raw(out) -> tuple[list, dict]:
    """Every summary value of every event file, as written ((tag, step, value) list; {(tag, step): wall time})."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    points, walls = [], {}
    for path in sorted((out / "tensorboard").glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for v in event.summary.value:
                points.append((v.tag, event.step, _value(v.tensor)))
                walls[(v.tag, event.step)] = event.wall_time
    return sorted(points, key=str), walls


def assert_curves_equal_the_log(out, log_name="log.jsonl"):
    """The event files under out/tensorboard hold the training log out/<log_name>, each (tag, step) once
    (also used on the demo DAG's runs, tests/test_pipeline.py)."""
    log, (raw, _), acc = _log_points(out, log_name), _raw(out), _accumulated(out)
    assert raw == log, (set(map(str, raw)) ^ set(map(str, log)))
    assert acc == log
    steps = [(tag, step) for tag, step, _ in raw]
    assert len(steps) == len(set(steps)), "a (tag, step) is in the event files more than once"


def test_xe_and_dico_curves_are_the_training_log(world, tmp_path):
    xe = _xe(world, tmp_path / "xe")
    assert_curves_equal_the_log(xe)
    spec = C.run_spec(C.validate(C.deep_merge(CONFIG, {})), "dico")
    dico = tmp_path / "dico"
    T.train_finetune(spec, world["splits"], world["features"], xe / "model.pt", dico / "work", dico / "model.pt",
                     dico / "log.jsonl", device="cpu", evaluators={"clip": world["ev"]},
                     image_embs={"clip": world["embs"]}, log=lambda *a: None, grammar=grammar_of(world["splits"]))
    assert_curves_equal_the_log(dico)
    tags = {tag for tag, _, _ in _raw(dico)[0]}
    assert {"train/loss", "train/reward_mean", "train/reward_best", "train/reward_std", "train/chosen_reward", "train/rejected_reward",
            "train/margin_acc", "train/grad_norm", "train/loss_scale", "val/CIDEr", "val/CLIP-S", "val/PAC-S",
            "val/fluent_pct", "val/example/text_summary"} <= tags, tags
    assert {"train/lr", "val/fluent_pct"} <= {tag for tag, _, _ in _raw(xe)[0]}
    assert [s for t, s, _ in _raw(dico)[0] if t == "val/CIDEr"] == [0, 2, 4]  # the start, then every val_every
    assert len(list((dico / "tensorboard").iterdir())) == 1


def test_a_crashed_run_resumes_the_same_curves_with_each_step_once(world, tmp_path, monkeypatch):
    """Crash in step 7 (last.pt at step 4; steps 5 and 6 already on the curves), then rerun: the curves
    hold steps 1..12 once each, equal the log, and keep the first attempt's wall times for steps 1..4."""
    real, calls = T.optimizer_step, {"n": 0}

    def crash_at_7(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 7:
            raise RuntimeError("injected crash")
        return real(*args, **kwargs)

    monkeypatch.setattr(T, "optimizer_step", crash_at_7)
    with pytest.raises(RuntimeError, match="injected crash"):
        _xe(world, tmp_path / "xe")
    monkeypatch.undo()
    assert torch.load(tmp_path / "xe" / "work" / "last.pt", weights_only=False)["step"] == 4
    before, walls = _raw(tmp_path / "xe")
    assert {s for t, s, _ in before if t == "train/loss"} == set(range(1, 7))  # 5, 6: past the checkpoint
    _xe(world, tmp_path / "xe")
    assert_curves_equal_the_log(tmp_path / "xe")
    after, walls_after = _raw(tmp_path / "xe")
    assert sorted(s for t, s, _ in after if t == "train/loss") == list(range(1, 13))
    assert all(walls_after[(t, s)] == walls[(t, s)] for t, s, _ in after if s <= 4)


def test_a_run_restarted_with_other_settings_drops_the_old_curves(world, tmp_path):
    _xe(world, tmp_path / "xe", C.deep_merge(CONFIG, {"xe": {"steps": 8}}))
    out = _xe(world, tmp_path / "xe", C.deep_merge(CONFIG, {"xe": {"steps": 4}}))  # last.pt: other spec
    assert_curves_equal_the_log(out)
    assert max(s for _, s, _ in _raw(out)[0]) == 4


def test_missing_tensorboard_is_named_with_its_fix(tmp_path, monkeypatch):
    import sys

    from dico.run_events import RunEvents

    RunEvents(tmp_path / "rank1", [], enabled=False)  # a rank other than 0 writes nothing
    assert not (tmp_path / "rank1").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ImportError, match=r"install the pinned tensorboard \(pip install -e '\.\[torch\]'"):
        RunEvents(tmp_path / "tb", [])

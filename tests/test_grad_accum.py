"""`scst.grad_accum` / `dico.grad_accum`: the global batch of a fine-tuning step in passes of whole
images gives the gradient, the logged numbers and the single optimiser and loss-scale step of one pass
over the whole batch, on one process and on each of 2 (their gradients summed, as the all-reduce does).
The run under torchrun with dropout on is in test_cli_ddp.py."""
import copy

import pytest
import torch

from dico import config as C
from dico import runtime
from dico.data import load_split
from dico.features import FeatureStore
from dico.rewards import ClipReward
from dico.tokenizer import CaptionTokenizer
from dico.train import FinetuneStep, build_model, images_per_pass
from worlds import make_world

BATCH, K = 8, 3


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """16 demo images with cached features and image embeddings, a random tiny CLIP as reward model."""
    return make_world(tmp_path_factory.mktemp("accum"), n_train=16, n_val=2, n_test=2, seed=3,
                      features=("train",), embeddings=("train",), shard_size=16, batch_size=16)


def _spec(method: str, grad_accum: int) -> dict:
    """Dropout off and candidates from eval mode: a step is then a deterministic function of the
    weights and the batch, so any difference between the configurations is float rounding."""
    config = C.load("config/config.yaml", {
        "model": {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.0},
        "decoding": {"max_len": 12},
        method: {"batch_images": BATCH, "k": K, "grad_accum": grad_accum, "generation_mode": "eval"}})
    return C.run_spec(config, "dico" if method == "dico" else "scst_cider")


def _one_step(world, method: str, grad_accum: int, world_size: int = 1) -> tuple[dict, list[dict], list[int]]:
    """One fine-tuning step of the same model on the same global batch, on each of `world_size`
    ranks in turn (a Dist without a process group: each rank keeps its own gradient). Returns the
    gradient summed over ranks (what the all-reduce sums), every rank's logged numbers and the image
    count of each encoder pass of the policy."""
    records = load_split(world["splits"], "train")
    tok = CaptionTokenizer.build("train", [c for r in records for c in r.captions])
    store = FeatureStore(world["features"]["train"])
    reward = ClipReward(world["ev"], world["embs"]["train"], w=2.0, input="text", tokenizer=tok)
    spec = _spec(method, grad_accum)
    torch.manual_seed(0)
    start = build_model(spec, tok, store.dim)
    total, stats, passes = {}, [], []
    for rank in range(world_size):
        policy = copy.deepcopy(start).train()
        reference = copy.deepcopy(start).eval().requires_grad_(False) if method == "dico" else None
        policy.bridge.register_forward_pre_hook(lambda mod, args: passes.append(args[0].shape[0]))
        opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
        grads = []
        opt.register_step_pre_hook(lambda o, a, kw: grads.append({n: p.grad.clone() for n, p in
                                                                   policy.named_parameters() if p.grad is not None}))
        scaler = runtime.DynamicLossScaler(True, initial=2.0 ** 10)  # scaled per pass, unscaled once
        dist = runtime.Dist()
        dist.world, dist.rank = world_size, rank
        step = FinetuneStep(spec, policy, reference, tok, reward, store, torch.arange(len(records)),
                            runtime.EpochSampler(len(records), seed=1), opt, scaler, dist, "cpu")
        stats.append(step())
        assert (len(grads), scaler.iteration) == (1, 1), "one optimiser and one loss-scale step per global batch"
        for name, g in grads[0].items():
            total[name] = total.get(name, 0) + g
    return total, stats, passes


# Tolerance. Every gradient entry is a float32 sum over the batch's B*k candidates and their tokens
# (8 * 3 * up to 13 ~ 300 terms), which accumulation and the split over ranks only regroup: partial
# sums per pass (and per rank), then added. Float32 rounds each addition by at most 2^-24 ~ 6e-8 of
# the running sum, so regrouping ~300 terms moves an entry by at most ~300 * 6e-8 ~ 2e-5 of the sum of
# the absolute values of its terms (and a smaller batch in a matmul changes its blocking, i.e. the
# rounding of the forward values, by as little). Entries are compared against the largest gradient
# entry, which bounds those sums here: 1e-4 of it is five times that bound, while a pass weighted
# wrongly (a per-pass mean not scaled by pass / batch, or divided twice) is off by a factor of 2 or
# more, i.e. by 50 % of the entries it changes. Measured here: at most 2.4e-7.
RTOL = 1e-4


def _max_relative_difference(a: dict, b: dict) -> float:
    scale = max(g.abs().max().item() for g in a.values())
    return max((a[n] - b[n]).abs().max().item() for n in a) / scale


@pytest.mark.parametrize("method", ["dico", "scst"])
@pytest.mark.parametrize("grad_accum,world_size", [(2, 1), (4, 1), (2, 2)])
def test_passes_give_the_gradient_and_the_log_of_one_pass(world, method, grad_accum, world_size):
    one, (stats_one,), passes_one = _one_step(world, method, 1)
    many, stats_many, passes_many = _one_step(world, method, grad_accum, world_size)
    per_pass = BATCH // (grad_accum * world_size)
    # the policy encodes each pass's images twice (beam search, then the log-probs with gradient)
    assert passes_one == [BATCH, BATCH] and passes_many == [per_pass] * (2 * grad_accum * world_size)
    assert one.keys() == many.keys() and max(g.abs().max().item() for g in one.values()) > 0
    diff = _max_relative_difference(one, many)
    print(f"{method} grad_accum {grad_accum} x {world_size} process(es): max |grad diff| / max |grad| = {diff:.2e}")
    assert diff <= RTOL, diff
    # the log: the whole global batch's numbers (ranks' equal shares averaged, as _Loop._log_row does)
    keys = ["loss", "reward_mean", "reward_best", "reward_std", "mean_len"]
    keys += ["chosen_reward", "rejected_reward", "margin_acc"] if method == "dico" else []
    for key in keys:
        mean = sum(s[key] for s in stats_many) / world_size
        assert mean == pytest.approx(stats_one[key], rel=1e-5, abs=1e-7), key
    if world_size == 1:  # without a process group a rank's norm is that of its own share
        assert stats_many[0]["grad_norm"] == pytest.approx(stats_one["grad_norm"], rel=1e-4)


@pytest.mark.parametrize("images,passes,world_size,fix", [
    (6, 4, 1, r"dico\.batch_images 6 does not split into dico\.grad_accum 4 passes of whole images on each of 1 "
              r"process\(es\); set dico\.batch_images to a multiple of 4 or dico\.grad_accum to one of \[1, 2, 3, 6\]"),
    (6, 2, 2, r"on each of 2 process\(es\); set dico\.batch_images to a multiple of 4 or dico\.grad_accum to one "
              r"of \[1, 3\]"),
    (5, 1, 2, r"set dico\.batch_images to a multiple of 2 \(or change the number of processes, train\.processes\)"),
])
def test_a_batch_that_does_not_split_names_the_keys_and_the_fix(images, passes, world_size, fix):
    with pytest.raises(ValueError, match=fix):
        images_per_pass("dico", {"batch_images": images, "grad_accum": passes}, world_size)
    assert images_per_pass("scst", {"batch_images": 16, "grad_accum": 4}, 2) == 2

"""The training rows of the fidelity ledger, each against an independent reference: DeepSpeed's loss
scaling rules (and torch's GradScaler where they coincide), HF's warm-up schedule (transformers),
the official reward input (open_clip's tokenizer, CLIP's pooling), the official validation form,
checkpoint selection and the official budget, the policy's mode while it generates candidates, and
collectives that NCCL accepts."""
import json
import socket

import pytest
import torch

from dico import config as C
from dico import runtime
from dico.train import optimizer_step, train_finetune, train_xe
from worlds import make_world, sigterm_at_step


# -- fp16 loss scaling: DeepSpeed's dynamic loss scaler (official configs/config_adam_zero2.json) -----
def _overflow_grads(params, overflow: bool):
    for p in params:
        p.grad = torch.full_like(p, float("inf") if overflow else 1.0)


def test_loss_scaler_with_hysteresis_1_is_torch_gradscaler():
    """With hysteresis 1 DeepSpeed's rules are torch.amp.GradScaler's (growth 2, backoff 0.5)."""
    pattern = [False] * 5 + [True] + [False] * 7 + [True, True] + [False] * 9 + [True] + [False] * 4
    ours = runtime.DynamicLossScaler(True, initial=2.0 ** 10, window=4, hysteresis=1, min_scale=1e-30)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_factor=2.0, backoff_factor=0.5, growth_interval=4)
    p = torch.nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([p], lr=0.0)
    for overflow in pattern:
        ref.scale(p.sum())  # GradScaler allocates its scale on first use
        _overflow_grads([p], overflow)
        ref.step(opt)  # finds the infs itself, skips the step
        ref.update()
        _overflow_grads([p], overflow)
        ours.update(ours.unscale_([p]))
        assert ours.scale == ref.get_scale()


def test_loss_scaler_follows_deepspeed_hysteresis_rules():
    """The rules of DeepSpeed's DynamicLossScaler.update_scale with hysteresis 2 (delayed_shift),
    worked out by hand: the first overflow only spends hysteresis, the second halves the scale, a
    window without overflow doubles it and refills the hysteresis; never below min_scale."""
    s = runtime.DynamicLossScaler(True, initial=64.0, window=3, hysteresis=2, min_scale=16.0)
    steps = [  # (overflow, scale after the update)
        (True, 64.0),    # iter 0: hysteresis 2 -> 1, scale kept
        (True, 32.0),    # iter 1: hysteresis 1: halve
        (True, 16.0),    # iter 2: halve again (hysteresis is refilled only by growth)
        (True, 16.0),    # iter 3: at min_scale
        (False, 16.0), (False, 16.0),
        (False, 32.0),   # iter 6: (6 - 3) % 3 == 0: double, hysteresis back to 2
        (True, 32.0),    # iter 7: hysteresis 2 -> 1, kept
        (False, 32.0), (False, 32.0),
        (False, 64.0),   # iter 10: (10 - 7) % 3 == 0
    ]
    for i, (overflow, want) in enumerate(steps):
        s.update(not overflow)
        assert s.scale == want, f"iteration {i}"
    assert s.skipped == 5


def test_optimizer_step_skips_an_overflow_and_unscales_otherwise():
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(4))
    opt = torch.optim.SGD([w], lr=0.5)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    scaler = runtime.DynamicLossScaler(True, initial=1024.0, window=1000, hysteresis=1)
    before = w.detach().clone()
    (w.sum() * float("inf")).backward()  # an fp16 overflow
    out = optimizer_step([w], opt, scaler, None, runtime.Dist(), sched)
    assert out["skipped"] == 1 and torch.equal(w.detach(), before) and sched.last_epoch == 0
    assert scaler.scale == 512.0 and out["grad_norm"] is None
    ((w ** 2).sum() * scaler.scale).backward()  # a scaled loss: the step must see the true gradient
    out = optimizer_step([w], opt, scaler, None, runtime.Dist(), sched)
    assert out["skipped"] == 0 and sched.last_epoch == 1
    assert torch.allclose(w.detach(), before - 0.5 * 2 * before, atol=1e-6)


def test_no_gradient_clipping_by_default_and_clipping_when_asked():
    schema_default = C.load("config/paper.yaml")["train"]["max_grad_norm"]
    assert schema_default is None  # official: DeepSpeed gradient_clipping absent = 0 = off
    for clip, want_norm in [(None, 10.0), (1.0, 1.0)]:
        w = torch.nn.Parameter(torch.zeros(2))
        opt = torch.optim.SGD([w], lr=1.0)
        w.grad = torch.tensor([6.0, 8.0])  # norm 10
        out = optimizer_step([w], opt, runtime.DynamicLossScaler(False), clip, runtime.Dist())
        assert out["grad_norm"] == pytest.approx(10.0)
        assert w.detach().norm().item() == pytest.approx(want_norm, rel=1e-5)


def test_xe_warmup_is_hf_constant_schedule_with_warmup():
    from transformers import get_constant_schedule_with_warmup

    from dico.train import constant_with_warmup

    for ratio, steps in [(0.05, 10000), (0.05, 150), (0.3, 7), (0.0, 5)]:
        ours = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0),
                                                 constant_with_warmup(ratio, steps))
        ref_opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
        # HF Trainer.get_warmup_steps: ceil(max_steps * warmup_ratio)
        import math
        ref = get_constant_schedule_with_warmup(ref_opt, num_warmup_steps=math.ceil(steps * ratio))
        for _ in range(min(steps, 700)):
            assert ours.get_last_lr() == ref.get_last_lr()
            ours.optimizer.step(), ours.step(), ref_opt.step(), ref.step()


# -- the training reward from the generated ids (official utils.py compute_clip_score, w=2.0) ---------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("fidelity"), n_train=30, n_val=8, n_test=4, seed=7,
                      features=("train", "val"), embeddings=("train", "val"), shard_size=16, batch_size=16)


def test_reward_from_ids_is_clip_of_the_generated_ids(world):
    from dico.clip_model import tokenize
    from dico.rewards import ClipReward, clip_text_ids
    from dico.tokenizer import CaptionTokenizer

    ev = world["ev"]
    captions = ["a red circle on the left", "two blue squares", "a small green triangle"]
    for tok in (CaptionTokenizer(), CaptionTokenizer.build("train", captions)):  # full and compact vocabularies
        ids = tok.batch_encode(captions, 20)  # [BOS, words, EOS, pad...] in model ids, as beams look
        clip = clip_text_ids(ids, tok, ev.context_length)
        # the independent reference: open_clip's tokenizer puts [SOT, BPE, EOT] then zeros
        assert torch.equal(clip, tokenize(captions, ev.context_length))
        embs = torch.nn.functional.normalize(torch.randn(3, ev.embed_dim, generator=torch.Generator().manual_seed(0)), dim=-1)
        r_ids = ClipReward(ev, embs, w=2.0, input="ids", tokenizer=tok)(ids, torch.arange(3))
        r_text = ClipReward(ev, embs, w=2.0, input="text", tokenizer=tok)(ids, torch.arange(3))
        assert torch.allclose(r_ids, r_text, atol=1e-6)  # same ids -> same reward
        want = 2.0 * (embs * ev.embed_tokens(tokenize(captions, ev.context_length))).sum(-1)
        assert torch.allclose(r_ids, want, atol=1e-6)  # w * cos, no clamp, no prefix


def test_a_beam_cut_without_eos_gets_the_constant_bos_reward(world):
    """CLIP pools at the highest id; with pads set to 0 and no EOS that is BOS at position 0, which
    (causal attention) sees nothing but BOS: every cut beam of an image gets the same reward."""
    from dico.rewards import ClipReward
    from dico.tokenizer import CaptionTokenizer, CLIP_BOS

    ev, tok = world["ev"], CaptionTokenizer()
    cut = tok.batch_encode(["a red circle left of a blue square", "three big green triangles"], 20)
    cut = cut[:, :5]  # BOS + 4 words, no EOS: as a beam stopped at max_len
    assert (cut == tok.eos_id).sum() == 0
    embs = torch.nn.functional.normalize(torch.randn(1, ev.embed_dim), dim=-1).expand(2, -1)
    r = ClipReward(ev, embs, w=2.0, input="ids", tokenizer=tok)(cut, torch.zeros(2, dtype=torch.long))
    assert r[0] == r[1]
    bos_only = torch.zeros(1, ev.context_length, dtype=torch.long)
    bos_only[0, 0] = CLIP_BOS
    assert torch.allclose(r[0], 2.0 * (embs[0] * ev.embed_tokens(bos_only)[0]).sum(), atol=1e-6)
    r_text = ClipReward(ev, embs, w=2.0, input="text", tokenizer=tok)(cut, torch.zeros(2, dtype=torch.long))
    assert r_text[0] != r_text[1]  # the text path scores them by their words


def test_rewards_default_to_the_ids_path():
    config = C.load("config/paper.yaml")
    assert all(r.get("input") == "ids" for r in config["rewards"].values() if r["type"] == "clip")


# -- checkpoint selection, validation form, budget, candidates' mode --------------------------------
def test_validation_form_is_the_official_compute_clip_score(world):
    from dico.metrics.clipscore import score_captions_validation_form

    ev = world["ev"]
    caps, refs = ["a red circle", "two squares"], [["a red circle", "a circle"], ["two blue squares", "boxes"]]
    img = torch.nn.functional.normalize(torch.randn(2, ev.embed_dim, generator=torch.Generator().manual_seed(3)), dim=-1)
    img[1] = -ev.embed_texts(["two squares"])[0]  # a negative candidate cosine: not clamped here
    out = score_captions_validation_form(ev, img, caps, refs, w=2.0)
    # written from official utils.py compute_clip_score(ref=True): clips = w*cos (no clamp);
    # ref = clip(max_r cos(c, r), 0); 2*clips*ref/(clips+ref); the text without prefix
    c = ev.embed_texts(caps)
    s = 2.0 * (img * c).sum(-1)
    t = torch.stack([(ev.embed_texts(r) @ c[i]).max() for i, r in enumerate(refs)]).clamp(min=0)
    assert s[1] < 0
    assert out["score_per_caption"] == pytest.approx(s.tolist(), abs=1e-6)
    assert out["ref_score_per_caption"] == pytest.approx((2 * s * t / (s + t)).tolist(), abs=1e-6)


def _finetune_spec(**overrides):
    base = {"model": {"d_model": 32, "enc_layers": 1, "dec_layers": 1, "n_heads": 2, "d_ff": 64, "dropout": 0.1},
            "xe": {"steps": 20, "batch_size": 30, "captions_per_image": 5, "val_every": 10, "lr": 3e-3},
            "decoding": {"max_len": 12, "beam_size": 3}, "train": {"log_every": 5, "val_images": 4},
            "rewards": {"cider": {"type": "cider"}, "clip_s": {"type": "clip", "model": "clip", "w": 2.5},
                        "pac_s": {"type": "clip", "model": "clip", "w": 2.0}},
            "evaluate": {"clip_s": {"model": "clip"}, "pac_s": {"model": "clip"}}}
    return C.load("config/config.yaml", C.deep_merge(base, overrides))


@pytest.fixture(scope="module")
def xe_checkpoint(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("xe")
    spec = C.run_spec(_finetune_spec(), "xe")
    runtime.configure(0, True)
    train_xe(spec, world["splits"], world["features"], out / "work", out / "model.pt", out / "log.jsonl",
             device="cpu", log=lambda *a: None)
    return out / "model.pt"


def _finetune(world, xe_checkpoint, out, config, monkeypatch=None):
    spec = C.run_spec(config, "dico")
    runtime.configure(0, True)
    embs = {"clip": {"train": world["embs"]["train"], "val": world["embs"]["val"]}}
    train_finetune(spec, world["splits"], world["features"], xe_checkpoint, out / "work", out / "model.pt",
                   out / "log.jsonl", device="cpu", evaluators={"clip": world["ev"]}, image_embs=embs,
                   log=lambda *a: None)
    rows = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    return torch.load(out / "model.pt", weights_only=False), rows


@pytest.mark.parametrize("include_start", [False, True])
def test_selection_never_picks_the_start_unless_asked(world, xe_checkpoint, tmp_path, include_start):
    """lr 0: every validation scores the same, so the first candidate wins (strictly-greater rule of
    HF's best-model tracking). Official: candidates are the multiples of eval_steps only; step 0 is
    validated for the log; a last step that is not a multiple is not validated."""
    config = _finetune_spec(dico={"steps": 25, "batch_images": 2, "val_every": 10, "lr": 1e-30, "k": 3},
                            selection={"include_start": include_start})
    payload, rows = _finetune(world, xe_checkpoint, tmp_path, config)
    val = [r for r in rows if r["phase"] == "val"]
    assert [r["step"] for r in val] == [0, 10, 20]
    assert val[0]["candidate"] is include_start
    assert payload["step"] == (0 if include_start else 10)


def test_patience_stops_a_run_and_the_default_budget_is_the_official_one(world, xe_checkpoint, tmp_path):
    config = _finetune_spec(dico={"steps": 200, "batch_images": 2, "val_every": 5, "lr": 1e-30, "k": 3,
                                  "patience": 2})
    payload, rows = _finetune(world, xe_checkpoint, tmp_path, config)
    assert [r["step"] for r in rows if r["phase"] == "val"] == [0, 5, 10, 15]
    assert rows[-1] == {"step": 15, "phase": "early_stop", "patience": 2}
    paper = C.load("config/paper.yaml")
    assert (paper["dico"]["steps"], paper["dico"]["val_every"], paper["dico"]["patience"]) == (250000, 1770, None)


def test_candidates_are_generated_in_train_mode_as_the_official_trainer(world, xe_checkpoint, tmp_path, monkeypatch):
    import dico.inference as I
    import dico.train as T

    modes, real = [], I.decode_beams

    def spy(model, memory, decoding):
        modes.append((model.training, decoding["beam_size"]))
        return real(model, memory, decoding)

    monkeypatch.setattr(T, "decode_beams", spy)  # the training step's candidates
    monkeypatch.setattr(I, "decode_beams", spy)  # validation's captions
    assert C.load("config/paper.yaml")["dico"]["generation_mode"] == "train"
    config = _finetune_spec(dico={"steps": 4, "batch_images": 2, "val_every": 2, "lr": 1e-4, "k": 3})
    _finetune(world, xe_checkpoint, tmp_path, config)
    # validations (eval mode, beam_size 3 from decoding) and training candidates (train mode, k)
    assert (True, 3) in modes and (False, 3) in modes
    assert modes.count((True, 3)) == 4  # one beam search per training step


# -- collectives NCCL accepts ----------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_dist_joins_a_group_under_torchrun_and_places_collectives_on_its_device(monkeypatch):
    """torchrun with one process must still join a process group, so one GPU runs the NCCL path; and
    NCCL only reduces tensors of the rank's device: the collectives must not use the default device.
    The default device is set to 'meta' here, so a tensor made without device= is a meta tensor that
    gloo rejects, as NCCL rejects a CPU tensor."""
    import torch.distributed as tdist

    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1",
           "TORCHELASTIC_RUN_ID": "test", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    d = runtime.Dist()
    try:
        assert d.setup("cpu") == "cpu"
        assert d.enabled and tdist.is_initialized()
        with torch.device("meta"):
            assert d.any(True) is True and d.any(False) is False
            assert d.sum([1.5, 2.0]) == [1.5, 2.0]
            assert d.gather({"a": 1}) == [{"a": 1}]
            d.barrier()
    finally:
        if tdist.is_initialized():
            tdist.destroy_process_group()


def test_loss_scaler_state_resumes_from_last_pt(world, tmp_path, monkeypatch):
    """fp16 runs carry the loss scaler's state in last.pt: a preempted run resumes with the same scale,
    hysteresis and overflow history and ends bit-identical to an uninterrupted one. (The scaler only
    switches on for fp16 on a GPU; it is forced on here, with a short window so that it changes.)"""
    stop_flag = runtime.StopFlag  # the real one, put back for the resumed run
    monkeypatch.setattr(runtime.DynamicLossScaler, "from_config",
                        classmethod(lambda cls, device, cfg: cls(True, initial=8.0, window=3, hysteresis=2)))
    spec = C.run_spec(_finetune_spec(xe={"steps": 12, "val_every": 4}), "xe")

    def run(out):
        runtime.configure(0, True)
        train_xe(spec, world["splits"], world["features"], out / "work", out / "model.pt", out / "log.jsonl",
                 device="cpu", log=lambda *a: None)
        return torch.load(out / "work" / "last.pt", weights_only=False)

    straight = run(tmp_path / "straight")
    assert straight["loss_scaler"]["scale"] == 8.0 * 2 ** 4  # doubled every 3 overflow-free steps
    sigterm_at_step(monkeypatch, 6)
    with pytest.raises(runtime.Preempted):
        run(tmp_path / "cut")
    assert torch.load(tmp_path / "cut" / "work" / "last.pt", weights_only=False)["loss_scaler"]["scale"] == 8.0 * 2 ** 2
    monkeypatch.setattr(runtime, "StopFlag", stop_flag)
    resumed = run(tmp_path / "cut")
    assert resumed["loss_scaler"] == straight["loss_scaler"]
    a, b = (torch.load(p / "model.pt", weights_only=False)["state_dict"] for p in (tmp_path / "straight", tmp_path / "cut"))
    assert all(torch.equal(a[k], b[k]) for k in a)

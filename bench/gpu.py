"""The paper's stages at the paper's shapes on a lent GPU, and an NCCL smoke run through the real CLI.

    python bench/gpu.py --all                 # CUDA: the sections below (< 5 min on one H100/H200-class GPU)
    python bench/gpu.py --only vit nccl       # some of them (also: features, compile; not in --all)
    python bench/gpu.py --smoke               # CPU, tiny models and counts, the --all sections (tests/test_bench.py)
    python bench/gpu.py --dry-run [--smoke]   # the plan, touching nothing
    python bench/gpu.py --only xe dico nccl --amp bf16   # train.amp bf16 instead of the paper's fp16

It prints one table (section, what, value, unit, peak memory, detail) and writes it to --json
(default results/bench/gpu.json; the machine, sizes and failures with it); on CUDA it also appends
the table to bench/RESULTS.md (--results). Without CUDA (and without --smoke) it says so and exits 0.
A section that fails (out of memory, a bug) is reported and the others still run; the exit code is 1.
Random weights throughout (open_clip `pretrained=None`): speed does not depend on the weights.

Sections of --all, at the paper's shapes (ViT-L/14 257 x 1024 features, CLIP's 49,409-token
vocabulary, the d=512 3 + 3-layer captioner, beam 5 x length 30, k = 5):
vit    ViT-L/14 grid features (dico.clip_model.Evaluator.grid_features) on pixels already on the GPU:
       fp32 weights under fp16 / bf16 autocast (what dico.features does per features.amp), bf16 weights,
       fp16 weights; img/s
       and the share of the card's dense bf16 peak (162 GFLOP per image).
xe     XE optimiser steps at the paper's batch (xe.batch_size 64 x grad_accum 8 = 512 captions, one
       (image, caption) pair per sample as captions_per_image null), train.amp auto, dico.runtime.adam
       (the fused kernel on CUDA): steps/s and target tokens/s.
dico   DiCO steps at 8 images per GPU x k = 5 (bench/step_bench.DicoStep: dico's beam_search,
       ClipReward with a random ViT-B/32 as the PAC-S model, sequence_logprobs of policy and frozen
       reference, dico_loss, clipping, Adam): steps/s and the share of each phase.
beam   beam search images/s at decoding.batch_size (64) and at 1,024 images per call.
nccl   `torchrun --standalone --nproc_per_node=1 -m dico train xe`, then `... train dico`, 3 steps each,
       with config/paper.yaml plus count overrides, on features `dico cache-features` computed from
       synthetic JPEGs with a random ViT-L/14 (and `dico cache-embeddings` of random ViT-B/32 CLIP /
       PAC-S models): the CUDA-only branches of the real CLI (NCCL process group, pinned memory and
       non_blocking copies in feature caching, bf16 autocast, fused Adam, torch.cuda.synchronize in
       the fine-tuning step, reward model and cached embeddings on the GPU, CUDA RNG state in
       checkpoints).
Optional: features (COCO-like JPEGs -> fp16 shard end to end: dico.features.cache_features vs a uint8 /
GPU-normalise pipeline), compile (XE steps with train.compile's torch.compile vs eager; minutes).
Peak memory: torch.cuda.max_memory_allocated per section on CUDA; on CPU the process's peak RSS
(meaningful per section when each section runs in its own process, as bench/paper_shapes.py does).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo root on sys.path)
from dico.io import write_json, write_text  # noqa: E402

ROOT = common.ROOT
RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTIONS = ("vit", "xe", "dico", "beam", "nccl")
OPTIONAL = ("features", "compile")  # only when named in --only
# dense bf16 tensor-core peaks, TFLOP/s (vendor specs)
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
CLIP_VOCAB = 49_409


@dataclass
class Sizes:
    name: str
    vit: str                 # open_clip model name of the backbone, or "tiny"
    reward_model: str        # open_clip model name of the PAC-S / CLIP-S stand-in, or "tiny"
    vit_batch: int
    vit_batches: int         # timed batches per variant
    tokens: int              # grid tokens and width of the features the captioner reads
    feat_dim: int
    xe_batch: int            # captions per pass (xe.batch_size)
    xe_accum: int            # passes per optimiser step (xe.grad_accum)
    xe_steps: int            # timed optimiser steps
    dico_images: int         # images per step and GPU
    dico_steps: int
    beam_batches: tuple      # images per beam-search call
    world: dict              # nccl: images per split
    cli_counts: dict         # nccl: count overrides of config/paper.yaml
    n_jpegs: int = 8192      # features section
    unique_jpegs: int = 1024
    vocab: int = CLIP_VOCAB  # always CLIP's full vocabulary: the LM head is the paper's
    model_kw: dict = field(default_factory=dict)  # captioner shape overrides (--smoke only)
    image_size: int = 224
    xe_warmup_passes: int = 1


_CLI_COUNTS = {"train": {"val_images": 4, "log_every": 1}, "xe": {"steps": 3, "val_every": 3},
               "dico": {"steps": 3, "val_every": 3, "batch_images": 8},
               "features": {"batch_size": 64, "num_workers": 4, "shard_size": 2048}}
PAPER = Sizes("paper", vit="ViT-L-14-quickgelu", reward_model="ViT-B-32-quickgelu", vit_batch=256, vit_batches=10,
              tokens=257, feat_dim=1024, xe_batch=64, xe_accum=8, xe_steps=5, dico_images=8, dico_steps=5,
              beam_batches=(64, 1024), world={"train": 32, "val": 8, "test": 8}, cli_counts=_CLI_COUNTS)
# the paper's shapes with counts a 2-core CPU gets through in minutes (bench/paper_shapes.py)
CPU_PAPER = Sizes("cpu-paper", vit="ViT-L-14-quickgelu", reward_model="ViT-B-32-quickgelu", vit_batch=4,
                  vit_batches=2, tokens=257, feat_dim=1024, xe_batch=64, xe_accum=8, xe_steps=1, dico_images=8,
                  dico_steps=2, beam_batches=(64,), world={"train": 8, "val": 2, "test": 2}, n_jpegs=16,
                  unique_jpegs=8,
                  cli_counts={"train": {"val_images": 2, "log_every": 1}, "xe": {"steps": 3, "val_every": 3,
                                                                                "batch_size": 8, "grad_accum": 2},
                              "dico": {"steps": 3, "val_every": 3, "batch_images": 2},
                              "features": {"batch_size": 4, "num_workers": 1, "shard_size": 2048}})
# --smoke: every code path of --all on a CPU in seconds; tiny models, CLIP's full vocabulary kept
SMOKE = Sizes("smoke", vit="tiny", reward_model="tiny", vit_batch=4, vit_batches=1, tokens=17, feat_dim=64,
              xe_batch=4, xe_accum=2, xe_steps=1, dico_images=2, dico_steps=1, beam_batches=(2, 4),
              world={"train": 6, "val": 2, "test": 2}, n_jpegs=16, unique_jpegs=4,
              cli_counts={"train": {"val_images": 2, "log_every": 1}, "xe": {"steps": 3, "val_every": 3,
                                                                            "batch_size": 4, "grad_accum": 2},
                          "dico": {"steps": 3, "val_every": 3, "batch_images": 2},
                          "features": {"batch_size": 4, "num_workers": 1, "shard_size": 4}},
              model_kw=dict(d_model=32, enc_layers=1, dec_layers=1, n_heads=2, d_ff=64), image_size=64)
SIZES = {s.name: s for s in (PAPER, CPU_PAPER, SMOKE)}
TINY_VIT = dict(patch_size=16, vision_width=64, vision_layers=1)


class Bench:
    def __init__(self, device: str, sz: Sizes, workers: int, tmp: Path, amp: str = "auto"):
        import torch

        self.torch, self.dev, self.sz, self.workers, self.tmp = torch, device, sz, workers, tmp
        self.cuda = device.startswith("cuda")
        self.amp = amp if self.cuda else "none"  # train.amp (default fp16, the paper's); CPU: none
        self.rows: list[dict] = []

    # -- helpers ------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_gib(self) -> float:
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() / 2**30
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux

    def row(self, section: str, metric: str, value: float, unit: str, detail: str = "", peak=True,
            cpu_s: float | None = None):
        """One result; `cpu_s` = CPU seconds (this process + finished children) per unit of `unit`."""
        r = {"section": section, "metric": metric, "value": value, "unit": unit,
             "peak_gib": round(self.peak_gib(), 2) if peak else None, "cpu_s": cpu_s, "detail": detail}
        self.rows.append(r)
        print(f"# {section}: {metric} {value:.4g} {unit} {detail}", flush=True)

    def evaluator(self, name: str):
        """A random-weight open_clip model as dico's Evaluator, created on the device."""
        from dico.clip_model import Evaluator

        if name == "tiny":
            return common.tiny_evaluator(image_size=self.sz.image_size, **TINY_VIT).to(self.dev)
        import open_clip

        return Evaluator(open_clip.create_model(name, pretrained=None, device=self.dev)).to(self.dev)

    def normalise(self, ev, x_uint8, dtype):
        """uint8 [B,3,S,S] on the device -> CLIP-normalised `dtype` pixels (channels_last)."""
        torch = self.torch
        mean = torch.tensor(ev.mean, device=x_uint8.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(ev.std, device=x_uint8.device).view(1, 3, 1, 1) * 255
        x = (x_uint8.float() - mean) / std
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    def card(self) -> str:
        return self.torch.cuda.get_device_name(0) if self.cuda else common.cpu_model()

    # -- vit ----------------------------------------------------------------------------------------
    def section_vit(self):
        torch, sz = self.torch, self.sz
        self.reset_peak()
        ev = self.vit_evaluator = self.evaluator(sz.vit)
        flop = vit_flop_per_image(ev)
        x8 = torch.randint(0, 256, (sz.vit_batch, 3, ev.image_size, ev.image_size), dtype=torch.uint8,
                           device=self.dev)

        def autocast(dtype):  # dico.features: fp32 weights and pixels under features.amp autocast on CUDA
            def run():
                with torch.autocast(device_type="cuda", dtype=dtype, enabled=self.cuda):
                    return ev.grid_features(self.normalise(ev, x8, torch.float32))
            return run

        def cast(dtype):
            return lambda: ev.grid_features(self.normalise(ev, x8, dtype))

        peak = peak_tflops(self.card()) if self.cuda else None
        for name, dtype, fn in (("fp32 weights + fp16 autocast (dico.features, features.amp fp16)", torch.float32,
                                 autocast(torch.float16)),
                                ("fp32 weights + bf16 autocast (features.amp bf16)", torch.float32, autocast(torch.bfloat16)),
                                ("bf16 weights + channels_last", torch.bfloat16, cast(torch.bfloat16)),
                                ("fp16 weights + channels_last", torch.float16, cast(torch.float16))):
            ev.model.to(dtype)
            self.reset_peak()
            with torch.no_grad():
                out = fn()
                assert out.shape == (sz.vit_batch, sz.tokens, sz.feat_dim), tuple(out.shape)
                self.sync()
                t, c = time.perf_counter(), cpu_seconds()
                for _ in range(sz.vit_batches):
                    fn()
                self.sync()
            n = sz.vit_batches * sz.vit_batch
            rate = n / (time.perf_counter() - t)
            mfu = f", {rate * flop / 1e12 / peak * 100:.0f}% of {peak:.0f} TFLOP/s" if peak else ""
            self.row("vit", f"grid features {out.shape[1]}x{out.shape[2]}, {name}", rate, "img/s",
                     f"{sz.vit}, batch {sz.vit_batch}, {flop / 1e9:.0f} GFLOP/img{mfu}", cpu_s=(cpu_seconds() - c) / n)
        ev.model.float()

    # -- xe -----------------------------------------------------------------------------------------
    def captioner(self, no_eos: bool):
        tok = common.caption_tokenizer(self.sz.vocab)
        model = common.paper_captioner(self.sz.vocab, feat_dim=self.sz.feat_dim, tok=tok, no_eos=no_eos,
                                       **self.sz.model_kw)
        return model.to(self.dev), tok

    def section_xe(self, compiled: bool = False):
        """dico.train.train_xe's optimiser step (one (image, caption) pair per sample, the mean over
        the step's target tokens, accumulation, clipping, Adam) on features resident on the device."""
        torch, sz = self.torch, self.sz
        from dico.model import token_xe_loss
        from dico.runtime import adam, autocast, maybe_compile

        self.reset_peak()
        variants = {"eager": self.captioner(no_eos=False)[0].train()}
        if compiled:
            variants["compiled"] = maybe_compile(copy.deepcopy(variants["eager"]), True, log=lambda *a: None)
        opts = {n: adam(m.parameters(), 2.5e-4, self.dev) for n, m in variants.items()}
        cfg = variants["eager"].cfg
        g = torch.Generator().manual_seed(0)
        store = torch.randn(max(64, sz.xe_batch), sz.tokens, sz.feat_dim, generator=g).half().to(self.dev)

        def batch():  # COCO captions: ~12 BPE tokens + EOS
            lens = torch.randint(9, 17, (sz.xe_batch,), generator=g)
            caps = torch.full((sz.xe_batch, int(lens.max()) + 2), cfg.pad_id, dtype=torch.long)
            for i, n in enumerate(lens.tolist()):
                caps[i, 0], caps[i, n + 1] = cfg.bos_id, cfg.eos_id
                caps[i, 1:n + 1] = torch.randint(0, cfg.vocab_size - 3, (n,), generator=g)
            return caps.to(self.dev), torch.randint(0, len(store), (sz.xe_batch,), generator=g).to(self.dev)

        def passes(name, n_passes):
            model, tokens = variants[name], 0
            for caps, image_of in [batch() for _ in range(n_passes)]:
                images, owner = torch.unique(image_of, return_inverse=True)
                with autocast(self.dev, self.amp):  # each image encoded once for its captions
                    cache = model.new_cache(model.encode(store[images].float()))
                    cache.reorder(owner)
                    logits = model.decode(caps[:, :-1], None, cache)
                    loss = token_xe_loss(logits.float(), caps, cfg.pad_id) / sz.xe_accum
                loss.backward()
                tokens += int((caps[:, 1:] != cfg.pad_id).sum())
            return tokens

        def step(name):
            tokens = passes(name, sz.xe_accum)
            torch.nn.utils.clip_grad_norm_(variants[name].parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            self.sync()
            return tokens

        flop = counted_flops(lambda: passes("eager", 1)) * sz.xe_accum  # one pass, x accumulation
        variants["eager"].zero_grad(set_to_none=True)
        first = {}
        for name in variants:  # warm-up: allocator, kernels, optimiser state (and compilation)
            t = time.perf_counter()
            passes(name, sz.xe_warmup_passes)
            variants[name].zero_grad(set_to_none=True)
            self.sync()
            first[name] = time.perf_counter() - t
        times, cpus, tokens = {n: [] for n in variants}, {n: [] for n in variants}, dict.fromkeys(variants, 0)
        names = list(variants)
        for s in range(sz.xe_steps):
            for name in names[s % len(names):] + names[:s % len(names)]:
                t, c = time.perf_counter(), cpu_seconds()
                tokens[name] += step(name)
                times[name].append(time.perf_counter() - t)
                cpus[name].append(cpu_seconds() - c)
        what = (f"{sz.xe_batch} x {sz.xe_accum} = {sz.xe_batch * sz.xe_accum} captions/step, "
                f"{sz.tokens}x{sz.feat_dim} features, vocab {cfg.vocab_size}, amp {self.amp}, "
                f"{'fused ' if self.cuda else ''}Adam; median of {sz.xe_steps}")
        for name in names:
            med = statistics.median(times[name])
            label = "XE optimiser step" + (f" ({name})" if compiled else "")
            self.row("compile" if compiled else "xe", label, 1 / med, "steps/s",
                     f"{med:.2f} s/step, {tokens[name] / sum(times[name]):.0f} target tokens/s, first pass "
                     f"{first[name]:.1f} s, {flop_note(flop, 1 / med)}; {what}",
                     cpu_s=statistics.median(cpus[name]))

    def section_compile(self):
        self.section_xe(compiled=True)

    # -- dico ---------------------------------------------------------------------------------------
    def section_dico(self):
        import step_bench

        sz = self.sz
        self.reset_peak()
        step = step_bench.DicoStep(sz.dico_images, tokens=sz.tokens, feat_dim=sz.feat_dim,
                                   n_train=max(64, 4 * sz.dico_images), vocab=sz.vocab, device=self.dev,
                                   amp=self.amp, evaluator=self.evaluator(sz.reward_model), fused_adam=self.cuda,
                                   model_kw=sz.model_kw)
        flop = counted_flops(step)  # one whole step, which is also the warm-up
        walls, cpus, phases = [], [], []
        for _ in range(sz.dico_steps):
            t, c = time.perf_counter(), cpu_seconds()
            phases.append(step())
            walls.append(time.perf_counter() - t)
            cpus.append(cpu_seconds() - c)
        assert step.mean_len == 29, f"beams should run to max_len (EOS pinned), got {step.mean_len}"
        ph = {p: statistics.median(x[p] for x in phases) for p in step_bench.PHASES}
        wall = statistics.median(walls)
        self.row("dico", f"DiCO step, {sz.dico_images} images x k=5", 1 / wall, "steps/s",
                 f"{wall:.2f} s/step, {sz.dico_images / wall:.1f} images/s, {flop_note(flop, 1 / wall)}; phases "
                 f"{step_bench.shares(ph)}; {sz.reward_model} ClipReward, vocab {sz.vocab}, all 29 tokens, "
                 f"amp {self.amp}; median of {sz.dico_steps}", cpu_s=statistics.median(cpus))

    # -- beam ---------------------------------------------------------------------------------------
    def section_beam(self):
        torch, sz = self.torch, self.sz
        from dico.decoding import beam_search
        from dico.runtime import autocast

        model, _ = self.captioner(no_eos=True)
        model.eval()
        g = torch.Generator().manual_seed(0)
        for B in sz.beam_batches:
            self.reset_peak()
            with torch.no_grad(), autocast(self.dev, self.amp):
                mem = model.encode(torch.randn(B, sz.tokens, sz.feat_dim, generator=g).to(self.dev))
                tokens, _ = beam_search(model, mem, beam_size=5, max_len=30)  # warm-up
                assert tuple(tokens.shape) == (B, 5, 30), tuple(tokens.shape)
                flop = counted_flops(lambda: beam_search(model, mem, beam_size=5, max_len=30))
                self.sync()
                t, c = time.perf_counter(), cpu_seconds()
                beam_search(model, mem, beam_size=5, max_len=30)
                self.sync()
            dt, cpu = time.perf_counter() - t, cpu_seconds() - c
            self.row("beam", f"beam search, {B} images per call", B / dt, "images/s",
                     f"{dt:.2f} s/call, {flop_note(flop, 1 / dt)}; beam 5, 29 steps forced (EOS pinned), vocab {sz.vocab}, "
                     f"{sz.tokens}-token memories, amp {self.amp}", cpu_s=cpu / B)
            del mem

    # -- nccl: the real CLI under torchrun ----------------------------------------------------------
    def section_nccl(self):
        sz = self.sz
        world = self.tmp / "world"
        t = time.perf_counter()
        run([sys.executable, __file__, "--prepare-world", str(world), "--sizes", sz.name, "--device", self.dev,
             "--amp", self.amp, *threads_args()], world.parent / "prepare.log")
        self.row("nccl", "world: JPEGs -> dico cache-features / cache-embeddings", time.perf_counter() - t, "s",
                 f"{sum(sz.world.values())} images, {sz.vit} features, {sz.reward_model} embeddings", peak=False)
        w = json.loads((world / "world.json").read_text())
        # torchrun itself (its console script is this module), with the interpreter running this script
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1", "-m", "dico"]
        common_args = ["--config", w["config"], "--splits", w["splits"], "--features-train", w["features"]["train"],
                       "--features-val", w["features"]["val"], *threads_args()]
        models = [a for n, p in w["checkpoints"].items() if n != "clip_l14" for a in ("--clip-model", f"{n}={p}")]
        embs = [a for key, p in w["embeddings"].items() for a in ("--embeddings", f"{key}={p}")]
        for run_name, extra in (("xe", []), ("dico", ["--init", str(world / "xe" / "model.pt"), *models, *embs])):
            out = world / run_name
            t = time.perf_counter()
            log = run([*torchrun, "train", run_name, *common_args, *extra, "--out-model", str(out / "model.pt"),
                       "--out-log", str(out / "train_log.jsonl")], out.parent / f"train_{run_name}.log")
            rows = [json.loads(x) for x in (out / "train_log.jsonl").read_text().splitlines()]
            steps = max(r["step"] for r in rows if r["phase"] == "train")
            procs = next((line.split("INFO ")[-1] for line in log.splitlines() if "process(es)" in line), "?")
            group = "NCCL" if "nccl" in log.lower() else "gloo" if "gloo" in log.lower() else "no"
            self.row("nccl", f"torchrun --nproc_per_node=1 -m dico train {run_name}", time.perf_counter() - t, "s",
                     f"{steps} steps, {procs}; process group named in the log: {group}", peak=False)
            assert steps == sz.cli_counts[run_name]["steps"], (run_name, steps)

    # -- features (optional): JPEG -> fp16 shard, end to end ----------------------------------------
    def section_features(self):
        import numpy as np

        import images
        from dico.data import ImageRecord
        from dico.features import cache_features

        torch, sz = self.torch, self.sz
        unique = images.write_jpegs(self.tmp / "unique", sz.unique_jpegs, seed=0, workers=max(1, os.cpu_count() or 1))
        paths = []
        for i in range(sz.n_jpegs):  # copies: same bytes, same decode cost, less writing
            dst = self.tmp / "jpg" / f"{i:06d}.jpg"
            dst.parent.mkdir(exist_ok=True)
            shutil.copyfile(unique[i % len(unique)], dst)
            paths.append(dst)
        ev = self.evaluator(sz.vit)
        self.reset_peak()
        records = [ImageRecord(i, p, ("a caption",)) for i, p in enumerate(paths)]
        ckpt = self.tmp / "vit.ckpt"
        ckpt.write_bytes(b"fingerprint stand-in")
        t, c = time.perf_counter(), cpu_seconds()
        cache_features(ev, "bench", ckpt, records, "bench", self.tmp / "current", shard_size=len(records),
                       batch_size=sz.vit_batch, num_workers=self.workers, device=self.dev, log=lambda *a, **k: None)
        rate, cpu = len(paths) / (time.perf_counter() - t), (cpu_seconds() - c) / len(paths)
        shutil.rmtree(self.tmp / "current", ignore_errors=True)
        self.row("features", "dico.features.cache_features, JPEG -> fp16 shard", rate, "img/s",
                 f"{len(paths)} COCO-like 640x480 JPEGs ({images.mean_file_kb(unique):.0f} KB), {self.workers} decode "
                 f"worker(s), batch {sz.vit_batch}, {sz.vit}, fp32 weights{' + fp16 autocast' if self.cuda else ''}",
                 cpu_s=cpu)
        if not self.cuda:
            return
        ev.model.to(torch.bfloat16)  # the proposed pipeline: uint8 crops, GPU normalisation, bf16 weights
        self.reset_peak()
        loader = torch.utils.data.DataLoader(_Uint8Images(paths, ev.image_size, True), batch_size=sz.vit_batch,
                                             num_workers=self.workers, pin_memory=True)
        shard = np.lib.format.open_memmap(self.tmp / "shard.npy", mode="w+", dtype=np.float16,
                                          shape=(len(paths), sz.tokens, sz.feat_dim))
        t, row = time.perf_counter(), 0
        with torch.no_grad():
            for x8 in loader:
                feats = ev.grid_features(self.normalise(ev, x8.to(self.dev, non_blocking=True), torch.bfloat16))
                shard[row:row + len(feats)] = feats.to(torch.float16).cpu().numpy()
                row += len(feats)
        del shard
        self.row("features", "uint8 crops + PIL draft + GPU normalise + bf16 (proposed)",
                 row / (time.perf_counter() - t), "img/s", "same JPEGs, workers and batch; not what dico does")


class _Uint8Images:
    """Decode (PIL draft) + CLIP resize/crop in a worker; uint8 [3,S,S] out."""

    def __init__(self, paths, size: int, draft: bool):
        self.paths, self.size, self.draft = paths, size, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import images

        load = images.load_draft if self.draft else images.load_full
        return images.to_uint8_chw(load(self.paths[i], self.size))


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its finished children (DataLoader workers):
    on a shared CPU the cost of the work itself, whatever share of the cores the other jobs leave."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def counted_flops(fn) -> float:
    """Matmul/conv/attention FLOPs of one call of fn, as torch.utils.flop_counter counts them (2 per
    multiply-add; element-wise ops, softmax and top-k are not counted)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


def flop_note(flop: float, per_s: float) -> str:
    return f"{flop / 1e9:.0f} GFLOP counted, {flop * per_s / 1e12:.3g} TFLOP/s achieved"


def threads_args() -> list[str]:
    """--threads N for a dico CLI step when the bench pins torch's threads."""
    n = os.environ.get("DICO_BENCH_THREADS")
    return ["--threads", n] if n else []


def run(cmd: list[str], log_path: Path) -> str:
    """Run a command; its output goes to log_path; a failure raises with the log's tail."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT).returncode
    text = log_path.read_text()
    if rc:
        raise RuntimeError(f"{' '.join(cmd[:8])} ... exited {rc}; log {log_path}:\n{text[-3000:]}")
    return text


# -- the nccl world (a child process: dico's CLI steps set process-wide torch flags) ---------------
def prepare_world(root: Path, sz: Sizes, device: str, amp: str = "auto") -> None:
    """Synthetic JPEGs in a Karpathy file, random checkpoints, config/paper.yaml + count overrides,
    then the real CLI steps: prepare-splits, cache-features (train, val), cache-embeddings."""
    import yaml

    import images
    from dico import cli
    from dico import config as C

    sys.path.insert(0, str(ROOT / "tests"))
    import paper_fixtures as F

    root.mkdir(parents=True, exist_ok=True)
    paths = images.write_jpegs(root / "images", sum(sz.world.values()), seed=1)
    entries, n = [], 0
    for split, count in sz.world.items():
        for _ in range(count):
            rng = random.Random(n)
            caps = [F.caption(rng) for _ in range(5)]
            entries.append({"filepath": "", "filename": paths[n].name, "imgid": n, "cocoid": 1000 + n, "split": split,
                            "sentences": [{"raw": c, "tokens": F.karpathy_tokens(c)} for c in caps]})
            n += 1
    (root / "dataset_coco.json").write_text(json.dumps({"images": entries, "dataset": "coco"}))
    ckpts = {name: root / f"{name}.pt" for name in ("clip_l14", "clip", "pac")}
    if sz.vit == "tiny":
        from dico.clip_weights import save_evaluator

        for seed, (name, path) in enumerate(ckpts.items()):
            save_evaluator(common.tiny_evaluator(image_size=sz.image_size, seed=seed, **TINY_VIT), path)
    else:
        F.write_openai_checkpoint(ckpts["clip_l14"], sz.vit, seed=1)
        F.write_openai_checkpoint(ckpts["clip"], sz.reward_model, seed=2)
        F.write_pacs_checkpoint(ckpts["pac"], sz.reward_model, seed=3)
    overrides = {"device": device, "data": {"source": "karpathy", "karpathy_json": str(root / "dataset_coco.json"),
                                            "image_root": str(root / "images")},
                 "clip_models": {n: {"path": str(p)} for n, p in ckpts.items()},
                 "ablations": {"beta": [0.2], "tau": [300], "k": [5], "reward": ["pac_s"]}, **sz.cli_counts}
    overrides["train"] = {**overrides["train"], "amp": amp}
    if sz.model_kw:
        overrides["model"] = sz.model_kw
    config = C.deep_merge(yaml.safe_load((ROOT / "config" / "paper.yaml").read_text()), overrides)
    C.validate(copy.deepcopy(config), "bench/gpu.py world")
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    cfg, splits = ["--config", str(root / "config.yaml")], str(root / "splits.json")

    def dico(*args):
        rc = cli.main([*args, *threads_args()] if args[0] != "prepare-splits" else list(args))
        if rc:
            raise RuntimeError(f"dico {' '.join(args)} exited {rc}")

    dico("prepare-splits", "--karpathy-json", str(root / "dataset_coco.json"), "--image-root", str(root / "images"),
         "--out", splits)
    features = {}
    for split in ("train", "val"):
        features[split] = str(root / "features" / split / "index.json")
        dico("cache-features", *cfg, "--splits", splits, "--split", split, "--out-dir", str(root / "features" / split))
    embeddings = {}
    for name, split in (("pac", "train"), ("pac", "val"), ("clip", "val")):  # reward (train) + validation scorers
        embeddings[f"{name}:{split}"] = str(root / "embeddings" / f"{name}_{split}.pt")
        dico("cache-embeddings", *cfg, "--name", name, "--splits", splits, "--split", split,
             "--out", embeddings[f"{name}:{split}"])
    (root / "world.json").write_text(json.dumps({"config": str(root / "config.yaml"), "splits": splits,
                                                 "features": features, "embeddings": embeddings,
                                                 "checkpoints": {n: str(p) for n, p in ckpts.items()}}))


# -- helpers ----------------------------------------------------------------------------------------
def vit_flop_per_image(ev) -> float:
    """2 x multiply-adds of the vision transformer's grid path (patch embedding + blocks)."""
    v = ev.model.visual
    d, layers = v.transformer.width, len(v.transformer.resblocks)
    patch = v.conv1.kernel_size[0]
    n = (ev.image_size // patch) ** 2 + 1
    mlp = v.transformer.resblocks[0].mlp.c_fc.out_features
    macs = layers * (4 * n * d * d + 2 * n * d * mlp + 2 * n * n * d) + (n - 1) * 3 * patch * patch * d
    return 2.0 * macs


def peak_tflops(card: str) -> float | None:
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):  # the most specific name first
        if key.lower() in card.lower():
            return PEAK_TFLOPS[key]
    return None


def table(rows: list[dict]) -> list[str]:
    """The results as one fixed-width table."""
    head = ("section", "what", "value", "unit", "peak GiB", "detail")
    body = [(r["section"], r["metric"], f"{r['value']:.4g}", r["unit"],
             "" if r["peak_gib"] is None else f"{r['peak_gib']:.2f}", r["detail"]) for r in rows]
    widths = [max(len(x[i]) for x in [head, *body]) for i in range(5)]
    fmt = "  ".join(f"{{:{'>' if i in (2, 4) else '<'}{w}}}" for i, w in enumerate(widths)) + "  {}"
    return [fmt.format(*head), *(fmt.format(*r) for r in body)]


def record(path: Path, header: str, lines: list[str], seconds: float) -> None:
    """Append a section (GPU results accumulate: one section per card and run)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    text = text.rstrip("\n") + "\n\n" + "\n".join(
        [f"### GPU run: {header}", "", f"`python bench/gpu.py --all` ({seconds / 60:.1f} min):", "", "```", *lines,
         "```"]) + "\n"
    write_text(path, text)


def plan(args, sz: Sizes) -> str:
    return (f"bench/gpu.py plan: device {args.device}, sizes {sz.name}, sections {', '.join(args.sections)}; "
            f"vit {sz.vit} batch {sz.vit_batch} x {sz.vit_batches}; XE {sz.xe_batch} x {sz.xe_accum} captions/step x "
            f"{sz.xe_steps} steps; DiCO {sz.dico_images} images x k=5 x {sz.dico_steps} steps; beam at "
            f"{'/'.join(map(str, sz.beam_batches))} images; nccl: torchrun --nproc_per_node=1 dico train xe / dico, "
            f"{sz.cli_counts['xe']['steps']} steps each, on {sum(sz.world.values())} images; vocabulary {sz.vocab}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--all", action="store_true", help="every section of the prepared GPU run (the default)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL, help="run these sections")
    ap.add_argument("--smoke", action="store_true", help="CPU, tiny models and counts: the code paths in seconds")
    ap.add_argument("--device", default=None, help="cuda (default) or cpu (--smoke and bench/paper_shapes.py)")
    ap.add_argument("--sizes", choices=sorted(SIZES), default=None, help="counts (default: paper, smoke with --smoke)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: cores - 2)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads, here and in the CLI steps (default on CPU: 1, see bench/RESULTS.md)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "bench" / "gpu.json", help="write the table here")
    ap.add_argument("--results", type=Path, default=None,
                    help=f"append the table to this Markdown file (default on CUDA: {RESULTS})")
    ap.add_argument("--amp", choices=["auto", "bf16", "fp16", "none"], default="fp16",
                    help="train.amp of the xe, dico, beam and nccl sections (default fp16: the paper's, with loss scaling)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    ap.add_argument("--prepare-world", type=Path, help=argparse.SUPPRESS)  # the nccl section's child process
    args = ap.parse_args(argv)
    sz = SIZES[args.sizes or ("smoke" if args.smoke else "paper")]
    args.device = args.device or ("cpu" if args.smoke else "cuda")
    args.sections = args.only or list(SECTIONS)
    if args.workers is None:
        args.workers = 1 if args.smoke else max(1, (os.cpu_count() or 2) - 2)
    if args.threads is None and args.device == "cpu":
        args.threads = 1  # on a busy CPU, OpenMP threads beyond the free cores stall each other
    if args.threads:
        os.environ["DICO_BENCH_THREADS"] = str(args.threads)
    if args.prepare_world:
        prepare_world(args.prepare_world, sz, args.device, args.amp)
        return 0
    if args.dry_run:
        print(plan(args, sz))
        return 0

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False): nothing measured. Run it on a "
              "GPU machine, or `--smoke` for a CPU run of the code paths.")
        return 0
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    info = common.machine_info()
    start = time.time()
    failed = []
    with tempfile.TemporaryDirectory(prefix="dico-gpu-bench-") as tmp:
        bench = Bench(args.device, sz, args.workers, Path(tmp), args.amp)
        header = f"{bench.card()} - " + common.describe_machine(info)
        print(f"# {header}\n# {plan(args, sz)}", flush=True)
        for name in args.sections:
            t = time.time()
            try:
                getattr(bench, f"section_{name}")()
            except Exception:
                failed.append(name)
                traceback.print_exc()
                print(f"# {name}: FAILED (traceback above)", flush=True)
            finally:
                if bench.cuda:
                    torch.cuda.empty_cache()
            print(f"# {name}: {time.time() - t:.0f} s", flush=True)
    seconds = time.time() - start
    lines = table(bench.rows)
    print("\n".join(lines))
    write_json(args.json, {"machine": info, "card": bench.card(), "device": args.device, "sizes": asdict(sz),
                           "sections": args.sections, "rows": bench.rows, "failed": failed, "seconds": seconds})
    print(f"# table written to {args.json}", flush=True)
    out = args.results or (RESULTS if bench.cuda else None)
    if out is not None and bench.rows:
        record(out, header, lines + ([f"# failed: {', '.join(failed)}"] if failed else []), seconds)
        print(f"# appended to {out}", flush=True)
    print(f"# done in {seconds:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""GPU benchmarks: feature caching, XE training, beam search and DiCO steps at the paper's sizes.

    python bench/gpu.py                       # on a CUDA machine: every section (~4-6 min, < 8 min budget),
                                              # results appended to bench/RESULTS.md with the card's name
    python bench/gpu.py --only vit features   # some sections (vit, features, xe, beam, dico)
    python bench/gpu.py --dry-run             # print the plan and exit (touches no GPU)
    python bench/gpu.py --device cpu --tiny   # the same code paths on CPU with tiny sizes (tests/test_bench.py)

Without CUDA (and without --device cpu) it prints why and exits 0. Each section runs under a global
time budget (--budget-s, default 450 s): a section that would not fit is skipped with a message, a
section that fails (e.g. out of memory) is reported and the others still run. Random weights
throughout (open_clip `pretrained=None`): throughput does not depend on the weights. Sections:

vit       ViT-L/14 grid features (dico.evaluator.Evaluator.grid_features, 257 x 1024) on pixels already on
          the GPU: the compute ceiling. fp32 weights under bf16 autocast (what dico.features does today)
          vs bf16 weights + channels_last input; img/s and the fraction of the card's dense bf16 peak
          (162 GFLOP per image, reference/peers.md section 4.1).
features  COCO-like 640x480 JPEGs -> fp16 features in a memory-mapped .npy shard, end to end. Proposed
          pipeline: many DataLoader workers decode with PIL draft (DCT-domain 1/2-scale decode) and
          return uint8 224x224 crops (4x fewer bytes than float32), pinned memory, normalisation on the
          GPU, bf16 weights, channels_last, batch 256, rows written into an np.lib.format.open_memmap
          shard as they come. Baseline: dico.features.cache_features as the pipeline calls it today
          (same workers and batch). Also the proposed pipeline with full decodes (the draft gain).
xe        XE teacher-forcing steps of the paper-size captioner (d=512, 3+3 layers, CLIP's 49,409-token
          vocabulary) on 257 x 1024 features resident on the GPU, as dico.train.train_xe runs them
          (captions_per_image 5: each image encoded once for its captions), bf16 autocast: target
          tokens/s with Adam(fused=True) vs the default (foreach) Adam.
beam      Beam search (beam 5, 29 steps forced) images/s at a large batch, and KV cache vs
          use_cache=False at a smaller one.
dico      DiCO steps (bench/step_bench.DicoStep: the library's beam_search, ClipReward with a random
          open_clip ViT-B/32 as the PAC-S stand-in, sequence_logprobs with repeats=k, dico_loss, fused
          Adam), bf16 autocast, at 16 images/step (the paper's global batch) and at 64: steps/s, phases,
          fast vs naive.
compile   Only with `--only compile` (compilation takes minutes): XE tokens/s with the encoder and decoder
          blocks compiled in place (dico.runtime.maybe_compile, what `train.compile: true` does) vs
          eager, both with fused Adam.
Peak GPU memory (torch.cuda.max_memory_allocated) is reported per section.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo root on sys.path)
from dico.io import write_text  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
SECTIONS = ("vit", "features", "xe", "beam", "dico")
OPTIONAL = ("compile",)  # run only when named in --only
# dense bf16 tensor-core peaks, TFLOP/s (vendor specs; reference/peers.md section 4.1)
PEAK_TFLOPS = {"H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0,
               "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0, "RTX 4090": 165.0, "RTX 3090": 71.0}


@dataclass
class Sizes:
    vit: str                 # open_clip model name, or "tiny"
    vit_batch: int
    vit_batches: int         # timed batches per variant, vit section
    n_jpegs: int             # files the feature pipeline reads
    unique_jpegs: int        # distinct images among them (the rest are copies: same decode cost)
    xe_captions: int         # captions per XE step (official: 64 x 8 accumulation = 512)
    xe_steps: int
    vocab: int
    tokens: int              # feature grid tokens and width
    feat_dim: int
    beam_batch: int
    beam_naive_batch: int
    dico_batches: tuple
    dico_steps: int
    reward_model: str        # open_clip model name, or "tiny"
    model_kw: dict = field(default_factory=dict)  # CaptionerConfig overrides (tiny only)
    image_size: int = 224


PAPER = Sizes(vit="ViT-L-14", vit_batch=256, vit_batches=20, n_jpegs=8192, unique_jpegs=1024, xe_captions=512,
              xe_steps=20, vocab=49_409, tokens=257, feat_dim=1024, beam_batch=1024, beam_naive_batch=64,
              dico_batches=(16, 64), dico_steps=8, reward_model="ViT-B-32")
TINY = Sizes(vit="tiny", vit_batch=8, vit_batches=1, n_jpegs=16, unique_jpegs=4, xe_captions=10, xe_steps=1,
             vocab=500, tokens=17, feat_dim=64, beam_batch=4, beam_naive_batch=2, dico_batches=(2,), dico_steps=1,
             reward_model="tiny", model_kw=dict(d_model=32, enc_layers=1, dec_layers=1, n_heads=2, d_ff=64),
             image_size=64)


class Bench:
    def __init__(self, device: str, sz: Sizes, workers: int, budget_s: float):
        import torch

        self.torch, self.dev, self.sz, self.workers = torch, device, sz, workers
        self.cuda = device.startswith("cuda")
        self.amp = "bf16" if self.cuda else "none"
        self.start, self.budget = time.time(), budget_s
        self.tmp = Path(tempfile.mkdtemp(prefix="dico-gpu-bench-"))
        self.lines: list[str] = []

    # -- helpers ------------------------------------------------------------------------------------
    def sync(self):
        if self.cuda:
            self.torch.cuda.synchronize()

    def reset_peak(self):
        if self.cuda:
            self.torch.cuda.empty_cache()
            self.torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        if not self.cuda:
            return "peak GPU memory n/a (CPU)"
        return f"peak GPU memory {self.torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"

    def prefetch(self, bytes_per_image: int) -> int:
        """DataLoader batches in flight per worker: 4, fewer if /dev/shm (where worker batches live)
        is small, as in containers with the 64 MB default."""
        try:
            free = shutil.disk_usage("/dev/shm").free
        except OSError:
            return 2
        per_round = max(1, self.workers) * self.sz.vit_batch * bytes_per_image
        for n in (4, 2, 1):
            if n * per_round * 2 < free:
                return n
        print(f"# warning: /dev/shm has {free / 2**20:.0f} MiB free, less than the DataLoader needs "
              f"({2 * per_round / 2**20:.0f} MiB): workers may die with a bus error", flush=True)
        return 1

    def left(self) -> float:
        return self.budget - (time.time() - self.start)

    def emit(self, line: str):
        print(line, flush=True)
        self.lines.append(line)

    def evaluator(self, name: str, **tiny_kw):
        """A random-weight open_clip model as dico's Evaluator, created directly on the device."""
        from dico.evaluator import Evaluator

        if name == "tiny":
            return common.tiny_evaluator(**tiny_kw).to(self.dev)
        import open_clip

        try:
            with self.torch.device(self.dev):  # initialise the weights where they will live
                model = open_clip.create_model(name, pretrained=None, device=self.dev)
        except Exception:
            model = open_clip.create_model(name, pretrained=None, device=self.dev)
        return Evaluator(model).to(self.dev)

    def vit(self):
        if self.sz.vit == "tiny":
            return self.evaluator("tiny", image_size=self.sz.image_size, patch_size=16, vision_width=64,
                                  vision_layers=1)
        return self.evaluator(self.sz.vit)

    def normalise(self, ev, x_uint8, dtype):
        """uint8 [B,3,S,S] on the device -> CLIP-normalised `dtype` pixels (channels_last)."""
        torch = self.torch
        mean = torch.tensor(ev.mean, device=x_uint8.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(ev.std, device=x_uint8.device).view(1, 3, 1, 1) * 255
        x = (x_uint8.float() - mean) / std
        return x.to(dtype).contiguous(memory_format=torch.channels_last)

    # -- vit: the compute ceiling -------------------------------------------------------------------
    def section_vit(self):
        torch, sz = self.torch, self.sz
        self.reset_peak()
        ev = self.vit()
        flop = vit_flop_per_image(ev)
        x8 = torch.randint(0, 256, (sz.vit_batch, 3, ev.image_size, ev.image_size), dtype=torch.uint8,
                           device=self.dev)

        def run_autocast():  # today's dico.features: fp32 weights, fp32 NCHW pixels, bf16 autocast
            mean = torch.tensor(ev.mean, device=self.dev).view(1, 3, 1, 1)
            std = torch.tensor(ev.std, device=self.dev).view(1, 3, 1, 1)
            with torch.autocast(device_type="cuda", dtype=torch.bfloat16, enabled=self.cuda):
                return ev.grid_features((x8.float() / 255 - mean) / std)

        def run_bf16():
            return ev.grid_features(self.normalise(ev, x8, torch.bfloat16 if self.cuda else torch.float32))

        rates = {}
        for name, fn in (("autocast", run_autocast), ("bf16", run_bf16)):
            if name == "bf16" and self.cuda:
                ev.model.to(torch.bfloat16)
            with torch.no_grad():
                out = fn()
                assert out.shape[0] == sz.vit_batch and out.shape[2] == ev.grid_width, tuple(out.shape)
                fn()
                self.sync()
                t = time.perf_counter()
                for _ in range(sz.vit_batches):
                    fn()
                self.sync()
            rates[name] = sz.vit_batches * sz.vit_batch / (time.perf_counter() - t)
        self.vit_rate = rates["bf16"]
        peak = peak_tflops(self.card()) if self.cuda else None
        mfu = f", {rates['bf16'] * flop / 1e12 / peak * 100:.0f}% of the {peak:.0f} TFLOP/s bf16 peak" if peak else ""
        self.emit(f"gpu_vit: {sz.vit} grid features ({out.shape[1]}x{out.shape[2]}, {flop / 1e9:.0f} GFLOP/img), "
                  f"random weights, batch {sz.vit_batch}, pixels already on the device: bf16 weights + channels_last "
                  f"{rates['bf16']:.0f} img/s{mfu} vs fp32 weights + bf16 autocast (dico.features today) "
                  f"{rates['autocast']:.0f} img/s; {self.peak()} {rates['bf16'] / rates['autocast']:.2f}x")
        del ev

    # -- features: JPEG -> fp16 shard, end to end --------------------------------------------------
    def jpegs(self):
        import images

        if getattr(self, "_jpegs", None) is None:
            t = time.perf_counter()
            unique = images.write_jpegs(self.tmp / "unique", self.sz.unique_jpegs, seed=0,
                                        workers=max(1, os.cpu_count() or 1))
            paths = []
            for i in range(self.sz.n_jpegs):  # copies: same bytes, same decode cost, less writing
                dst = self.tmp / "jpg" / f"{i:06d}.jpg"
                dst.parent.mkdir(exist_ok=True)
                shutil.copyfile(unique[i % len(unique)], dst)
                paths.append(dst)
            self._jpegs = paths
            print(f"# wrote {len(paths)} JPEGs ({len(unique)} distinct, {images.mean_file_kb(unique):.0f} KB mean) "
                  f"in {time.perf_counter() - t:.1f} s", flush=True)
        return self._jpegs

    def proposed_pipeline(self, ev, paths, draft: bool, out_path: Path) -> tuple[float, float]:
        """(overall img/s, steady img/s after the first batch) of the proposed feature caching."""
        import numpy as np

        torch = self.torch
        ds = _Uint8Images(paths, ev.image_size, draft)
        loader = torch.utils.data.DataLoader(ds, batch_size=self.sz.vit_batch, num_workers=self.workers,
                                             pin_memory=self.cuda,
                                             prefetch_factor=self.prefetch(3 * ev.image_size ** 2) if self.workers else None)
        dtype = torch.bfloat16 if self.cuda else torch.float32
        shard = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float16,
                                          shape=(len(paths), *self.grid_shape))
        t0 = time.perf_counter()
        first, row = None, 0
        with torch.no_grad():
            for x8 in loader:
                feats = ev.grid_features(self.normalise(ev, x8.to(self.dev, non_blocking=True), dtype))
                shard[row:row + len(feats)] = feats.to(torch.float16).cpu().numpy()
                row += len(feats)
                if first is None:
                    first = (time.perf_counter(), row)
        shard.flush()
        del shard
        total = time.perf_counter() - t0
        steady = (row - first[1]) / max(time.perf_counter() - first[0], 1e-9) if row > first[1] else float("nan")
        return row / total, steady

    def current_pipeline(self, ev, paths, out_dir: Path) -> float:
        from dico.data import ImageRecord
        from dico.features import cache_features

        records = [ImageRecord(i, p, ("a caption",)) for i, p in enumerate(paths)]
        ckpt = self.tmp / "vit.ckpt"
        ckpt.write_bytes(b"fingerprint stand-in")
        t = time.perf_counter()
        cache_features(ev, "bench", ckpt, records, "bench", out_dir, shard_size=len(records),
                       batch_size=self.sz.vit_batch, num_workers=self.workers, device=self.dev,
                       log=lambda *a, **k: None)
        rate = len(paths) / (time.perf_counter() - t)
        shutil.rmtree(out_dir, ignore_errors=True)
        return rate

    def section_features(self):
        torch = self.torch
        paths = self.jpegs()
        self.reset_peak()
        ev = self.vit()
        with torch.no_grad():
            probe = ev.grid_features(torch.zeros(1, 3, ev.image_size, ev.image_size, device=self.dev))
        self.grid_shape = tuple(probe.shape[1:])
        if self.cuda:
            ev.model.to(torch.bfloat16)
        out = self.tmp / "shard.npy"
        prop = [self.proposed_pipeline(ev, paths, True, out) for _ in range(2)]
        full = self.proposed_pipeline(ev, paths, False, out)
        out.unlink(missing_ok=True)
        overall, steady = max(p[0] for p in prop), max(p[1] for p in prop)
        ev.model.float()  # today's pipeline: fp32 weights under bf16 autocast
        try:
            cur, why = self.current_pipeline(ev, paths, self.tmp / "current"), ""
        except Exception as e:  # e.g. float32 batches of 14 workers overflowing a small /dev/shm
            traceback.print_exc()
            cur, why = None, f"{type(e).__name__}: {str(e)[:120]}"
        line = (f"gpu_features: {len(paths)} COCO-like 640x480 JPEGs -> {self.grid_shape[0]}x{self.grid_shape[1]} "
                f"fp16 shard, {self.sz.vit}, {self.workers} decode workers, batch {self.sz.vit_batch}: proposed "
                f"(PIL draft, uint8 transfer, GPU normalise, bf16 + channels_last, memmap shard) {overall:.0f} img/s "
                f"overall, {steady:.0f} img/s after the first batch; same with full decodes {full[0]:.0f} / "
                f"{full[1]:.0f} img/s; model alone {getattr(self, 'vit_rate', float('nan')):.0f} img/s; {self.peak()}; ")
        if cur is not None:
            line += f"proposed vs dico.features.cache_features today ({cur:.0f} img/s) {overall / cur:.2f}x"
        else:
            line += (f"dico.features.cache_features today failed ({why}); draft vs full decodes "
                     f"{overall / full[0]:.2f}x")
        self.emit(line)
        del ev

    # -- xe: teacher forcing tokens/s --------------------------------------------------------------
    def xe_steps(self, variants: dict) -> dict:
        """Interleaved XE steps of each {name: (model, optimizer)}: dico.train.train_xe's step with
        captions_per_image 5 (each image encoded once, its cross K/V gathered for its captions).
        Returns {name: (target tokens/s, median s/step, first-step s)}."""
        torch, sz = self.torch, self.sz
        from dico.model import token_xe_loss
        from dico.runtime import autocast

        any_model = next(iter(variants.values()))[0]
        cfg = any_model.cfg
        cpi, n_img = 5, max(1, sz.xe_captions // 5)
        g = torch.Generator().manual_seed(0)
        store = torch.randn(4 * n_img, sz.tokens, sz.feat_dim, generator=g).half().to(self.dev)

        def batch():
            images = torch.randint(0, len(store), (n_img,), generator=g)
            lens = torch.randint(9, 17, (n_img * cpi,), generator=g)  # COCO: ~12 BPE tokens + EOS
            caps = torch.full((n_img * cpi, int(lens.max()) + 2), cfg.pad_id, dtype=torch.long)
            for i, n in enumerate(lens.tolist()):
                caps[i, 0] = cfg.bos_id
                caps[i, 1:n + 1] = torch.randint(0, cfg.vocab_size - 3, (n,), generator=g)
                caps[i, n + 1] = cfg.eos_id
            owner = torch.arange(n_img).repeat_interleave(cpi)
            return store[images.to(self.dev)], caps.to(self.dev), owner.to(self.dev)

        def step(name, feats, caps, owner):
            model, opt = variants[name]
            with autocast(self.dev, self.amp):
                cache = model.new_cache(model.encode(feats))
                cache.reorder(owner)
                logits = model.decode(caps[:, :-1], None, cache)
                loss = token_xe_loss(logits.float(), caps, cfg.pad_id)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        batches = [batch() for _ in range(4)]
        names = list(variants)
        first, times, tokens = {}, {n: [] for n in names}, dict.fromkeys(names, 0)
        for name in names:  # warm-up: allocator, cuBLAS handles, optimiser state (and compilation)
            t = time.perf_counter()
            step(name, *batches[0])
            self.sync()
            first[name] = time.perf_counter() - t
        for s in range(sz.xe_steps):
            for name in names[s % len(names):] + names[:s % len(names)]:
                feats, caps, owner = batches[s % len(batches)]
                t = time.perf_counter()
                step(name, feats, caps, owner)
                self.sync()
                times[name].append(time.perf_counter() - t)
                tokens[name] += int((caps[:, 1:] != cfg.pad_id).sum())
        self.xe_batch = f"{n_img * cpi} captions/step ({n_img} images x {cpi})"
        return {n: (tokens[n] / sum(times[n]), statistics.median(times[n]), first[n]) for n in names}

    def xe_model(self, base=None):
        sz = self.sz
        if base is not None:
            return copy.deepcopy(base).train()
        tok = common.caption_tokenizer(sz.vocab)
        return common.paper_captioner(sz.vocab, feat_dim=sz.feat_dim, tok=tok, no_eos=False,
                                      **sz.model_kw).to(self.dev).train()

    def section_xe(self):
        torch, sz = self.torch, self.sz
        self.reset_peak()
        a = self.xe_model()
        b = self.xe_model(a)
        res = self.xe_steps({"fused": (a, torch.optim.Adam(a.parameters(), lr=2.5e-4, fused=True)),
                             "foreach": (b, torch.optim.Adam(b.parameters(), lr=2.5e-4))})
        (fused, ms, _), (foreach, _, _) = res["fused"], res["foreach"]
        self.emit(f"gpu_xe: XE steps of the paper-size captioner (vocab {sz.vocab}) on {sz.tokens}x{sz.feat_dim} "
                  f"features resident on the device, {self.xe_batch}, {self.amp} autocast: {fused:.0f} target "
                  f"tokens/s ({ms * 1e3:.0f} ms/step) with Adam(fused=True) vs {foreach:.0f} with the default "
                  f"Adam; {self.peak()} {fused / foreach:.2f}x")

    def section_compile(self):
        """Not in the default list (compilation takes a minute or more): --only compile."""
        torch, sz = self.torch, self.sz
        self.reset_peak()
        eager = self.xe_model()
        compiled = self.xe_model(eager)
        from dico.runtime import maybe_compile

        maybe_compile(compiled, True, log=lambda *a: None)  # what train.compile: true does
        res = self.xe_steps({n: (m, torch.optim.Adam(m.parameters(), lr=2.5e-4, fused=self.cuda or None))
                             for n, m in (("compiled", compiled), ("eager", eager))})
        (c, ms, first), (e, _, _) = res["compiled"], res["eager"]
        self.emit(f"gpu_xe_compile: XE steps as gpu_xe ({self.xe_batch}, fused Adam), encoder + decoder blocks "
                  f"torch.compile(dynamic=True) {c:.0f} tokens/s ({ms * 1e3:.0f} ms/step, first step incl. "
                  f"compilation {first:.0f} s) vs eager {e:.0f} tokens/s; {self.peak()} {c / e:.2f}x")

    # -- beam ---------------------------------------------------------------------------------------
    def section_beam(self):
        torch, sz = self.torch, self.sz
        from dico.decoding import beam_search
        from dico.runtime import autocast

        self.reset_peak()
        model = common.paper_captioner(sz.vocab, feat_dim=sz.feat_dim, **sz.model_kw).to(self.dev)
        g = torch.Generator().manual_seed(0)

        def memory(B):
            with torch.no_grad(), autocast(self.dev, self.amp):
                return model.encode(torch.randn(B, sz.tokens, sz.feat_dim, generator=g).half().to(self.dev))

        def run(mem, cache=True):
            with autocast(self.dev, self.amp):
                tokens, _ = beam_search(model, mem, beam_size=5, max_len=30, use_cache=cache)
            self.sync()
            return tokens

        big = memory(sz.beam_batch)
        tokens = run(big)
        assert tokens.size(-1) == 30, "a beam ended early"
        t = time.perf_counter()
        run(big)
        big_rate = sz.beam_batch / (time.perf_counter() - t)
        peak = self.peak()
        del big
        small = memory(sz.beam_naive_batch)
        run(small), run(small, False)
        res = {True: [], False: []}
        for r in range(3):
            for cache in ((True, False) if r % 2 == 0 else (False, True)):
                t = time.perf_counter()
                run(small, cache)
                res[cache].append(time.perf_counter() - t)
        fast, slow = statistics.median(res[True]), statistics.median(res[False])
        self.emit(f"gpu_beam: beam search (beam 5, 29 steps forced), paper-size captioner (vocab {sz.vocab}), "
                  f"{sz.tokens}-token memories, {self.amp} autocast: {big_rate:.0f} images/s at {sz.beam_batch} images "
                  f"per call ({peak}); at {sz.beam_naive_batch} images, KV cache {sz.beam_naive_batch / fast:.0f} "
                  f"images/s vs use_cache=False {sz.beam_naive_batch / slow:.0f} images/s {slow / fast:.1f}x")
        del model

    # -- dico ---------------------------------------------------------------------------------------
    def section_dico(self):
        import step_bench

        sz = self.sz
        reward_ev = self.evaluator(sz.reward_model)
        for i, B in enumerate(sz.dico_batches):
            if i and self.left() < 60:
                print(f"# gpu_dico at batch {B} skipped: {self.left():.0f} s of the budget left", flush=True)
                break
            self.reset_peak()
            step = step_bench.DicoStep(B, tokens=sz.tokens, feat_dim=sz.feat_dim, n_train=max(256, 4 * B),
                                       vocab=sz.vocab, device=self.dev, amp=self.amp, evaluator=reward_ev,
                                       fused_adam=self.cuda, model_kw=sz.model_kw)
            ph, naive = step_bench.run_steps(step, sz.dico_steps, with_naive=(i == 0))
            rate = B / ph["total"]
            if i == 0:
                first_rate = rate
                vs = (f"; fast vs naive step (beam without KV cache, memory repeated k times) "
                      f"({naive * 1e3:.0f} ms vs {ph['total'] * 1e3:.0f} ms) {naive / ph['total']:.1f}x")
            else:
                vs = f"; images/s relative to batch {sz.dico_batches[0]} {rate / first_rate:.2f}x"
            self.emit(f"gpu_dico_step{'' if i == 0 else f'_b{B}'}: DiCO step, {B} images x k=5 (29 tokens each), "
                      f"paper-size captioner (vocab {sz.vocab}) on {sz.tokens}x{sz.feat_dim} features, "
                      f"{sz.reward_model} ClipReward, {'fused ' if self.cuda else ''}Adam, {self.amp} autocast: "
                      f"{1 / ph['total']:.2f} steps/s ({rate:.0f} images/s); phases {step_bench.shares(ph)}; "
                      f"{self.peak()}" + vs)
            del step

    def card(self) -> str:
        return self.torch.cuda.get_device_name(0) if self.cuda else common.cpu_model()


class _Uint8Images:
    """Decode (optionally PIL draft) + CLIP resize/crop in a worker; uint8 [3,S,S] out."""

    def __init__(self, paths, size: int, draft: bool):
        self.paths, self.size, self.draft = paths, size, draft

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        import images

        load = images.load_draft if self.draft else images.load_full
        return images.to_uint8_chw(load(self.paths[i], self.size))


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


def plan(args, sz: Sizes) -> str:
    return (f"bench/gpu.py plan: device {args.device}, sizes {'tiny' if args.tiny else 'paper'}, sections "
            f"{', '.join(args.only or SECTIONS)}, budget {args.budget_s:.0f} s, {args.workers} decode workers; "
            f"vit {sz.vit} batch {sz.vit_batch}; {sz.n_jpegs} JPEGs; XE {sz.xe_captions} captions/step x "
            f"{sz.xe_steps} steps; beam at {sz.beam_batch} and {sz.beam_naive_batch} images; DiCO at "
            f"{'/'.join(map(str, sz.dico_batches))} images x {sz.dico_steps} steps")


def record(path: Path, header: str, lines: list[str], seconds: float) -> None:
    """Append a section (GPU results accumulate: one section per card and run)."""
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    text = text.rstrip("\n") + "\n\n" + "\n".join(
        [f"### GPU run: {header}", "", f"`python bench/gpu.py` ({seconds / 60:.1f} min):", "", "```", *lines, "```"]) + "\n"
    write_text(path, text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: a smoke run)")
    ap.add_argument("--tiny", action="store_true", help="tiny models and sizes (CPU smoke test of the code paths)")
    ap.add_argument("--only", nargs="+", choices=SECTIONS + OPTIONAL,
                    help="run these sections (compile: XE with torch.compile, minutes; not in the default list)")
    ap.add_argument("--budget-s", type=float, default=450.0, help="time budget for all sections (default 450)")
    ap.add_argument("--workers", type=int, default=None, help="decode workers (default: cores - 2)")
    ap.add_argument("--results", type=Path, default=None, help=f"append results here (default {RESULTS}; "
                    "--device cpu runs append only when this is given)")
    ap.add_argument("--dry-run", action="store_true", help="print the plan and exit")
    args = ap.parse_args(argv)
    sz = TINY if args.tiny else PAPER
    if args.workers is None:
        args.workers = 2 if args.tiny else max(1, (os.cpu_count() or 2) - 2)
    if args.dry_run:
        print(plan(args, sz))
        return 0

    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench/gpu.py: no CUDA device (torch.cuda.is_available() is False): nothing measured. "
              "Run it on a GPU machine, or `--device cpu --tiny` for a smoke run of the code paths.")
        return 0
    if args.device == "cpu" and not args.tiny:
        print("bench/gpu.py: --device cpu runs only with --tiny (the paper sizes take hours on a CPU)")
        return 2
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    bench = Bench(args.device, sz, args.workers, args.budget_s)
    info = common.machine_info()
    header = f"{bench.card()} — " + common.describe_machine(info)
    print(f"# {header}\n# {plan(args, sz)}", flush=True)
    # rough share of the budget each section needs to be worth starting (paper sizes)
    need = ({"vit": 40, "features": 120, "xe": 40, "beam": 40, "dico": 90, "compile": 150} if not args.tiny
            else dict.fromkeys(SECTIONS + OPTIONAL, 0))
    failed = []
    try:
        for name in args.only or SECTIONS:
            if bench.left() < need[name]:
                print(f"# {name}: skipped, {bench.left():.0f} s of the {args.budget_s:.0f} s budget left", flush=True)
                continue
            t = time.time()
            try:
                getattr(bench, f"section_{name}")()
            except Exception:
                failed.append(name)
                traceback.print_exc()
                print(f"# {name}: FAILED (traceback on stderr)", flush=True)
            finally:
                if bench.cuda:
                    torch.cuda.empty_cache()
            print(f"# {name}: {time.time() - t:.0f} s", flush=True)
    finally:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    seconds = time.time() - bench.start
    out = args.results or (RESULTS if bench.cuda else None)
    if out is not None and bench.lines:
        record(out, header, bench.lines + ([f"# failed: {', '.join(failed)}"] if failed else []), seconds)
        print(f"# appended to {out}", flush=True)
    print(f"# done in {seconds:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Shared pieces of the benchmarks: interleaved timing, the machine description, the models they run.

Every comparison times both sides in the same process, alternating them (A B A B ...) so that both
see the same load from other jobs, and reports medians and the ratio of medians. Absolute times on
a shared 2-core machine move by 2-10x with the load; the ratios are what the benchmarks claim.
"""
from __future__ import annotations

import datetime
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """{name: median seconds} of `repeats` rounds that each call every fn once, in an order that
    rotates from round to round (so no side always runs first, right after the other)."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            times[name].append(timed(fns[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict:
    import torch

    info = {"date": datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "cpu": cpu_model(), "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version()}
    try:
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def describe_machine(info: dict) -> str:
    parts = [f"{info['cpu']}, {info['cores']} cores", f"torch {info['torch']} ({info['torch_threads']} thread(s))",
             f"Python {info['python']}"]
    if "gpu" in info:
        parts.append(info["gpu"])
    if "load_avg_1m" in info:
        parts.append(f"load average {info['load_avg_1m']} at the start")
    return f"{info['date']}: " + ", ".join(parts)


# -- models ---------------------------------------------------------------------------------------
def caption_tokenizer(vocab: int):
    """A CaptionTokenizer over the first vocab-3 CLIP BPE ids (+ BOS, EOS, pad): `vocab` model ids."""
    from dico.tokenizer import CaptionTokenizer

    return CaptionTokenizer(range(vocab - 3))


def paper_captioner(vocab: int = 10_000, feat_dim: int = 1024, seed: int = 0, no_eos: bool = True,
                    tok=None, **overrides):
    """The paper's captioner (d=512, 3+3 layers, 8 heads, d_ff 2048), random weights, eval mode.

    `no_eos`: the EOS row of the tied embedding is zeroed, so the EOS logit is exactly 0 while the
    other ~10k logits of a random model spread around 0 with std ~0.5; EOS then never makes the top k
    of the k x V beam candidates and every beam runs the full max_len - 1 steps (the worst case, and
    a fixed amount of work to time). Callers check the generated length. `overrides` change
    CaptionerConfig fields (the tiny smoke runs).
    """
    import torch

    from dico.model import Captioner, CaptionerConfig

    tok = tok or caption_tokenizer(vocab)
    cfg = CaptionerConfig(feat_dim=feat_dim, vocab_size=tok.vocab_size, pad_id=tok.pad_id, bos_id=tok.bos_id,
                          eos_id=tok.eos_id, **overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Captioner(cfg)
    if no_eos:
        with torch.no_grad():
            model.decoder.wte.weight[cfg.eos_id].zero_()
    return model.eval()


def tiny_evaluator(image_size: int = 32, patch_size: int = 8, vision_width: int = 64, vision_layers: int = 1,
                   context_length: int = 77, seed: int = 0):
    """A random tiny open_clip CLIP wrapped as dico's Evaluator (text tower 2 x 64, CLIP's 77 tokens)."""
    from dico.demo.clip import build_tiny_clip, tiny_clip_config
    from dico.clip_model import Evaluator

    cfg = tiny_clip_config(embed_dim=64, image_size=image_size, patch_size=patch_size, vision_width=vision_width,
                           vision_layers=vision_layers, text_width=64, text_layers=2, context_length=context_length)
    return Evaluator(build_tiny_clip(cfg, seed))


def record_block(results: Path, begin: str, end: str, command: str, header: str, lines: list[str],
                 seconds: float) -> None:
    """Replace the generated block between `begin` and `end` markers of `results` (RESULTS.md) with this
    run's lines, or append it (creating the file if needed); written atomically."""
    from dico.io import write_text

    block = "\n".join([begin, f"Machine: {header}", "", f"`{command}` ({seconds / 60:.1f} min):", "", "```",
                       *lines, "```", end])
    text = results.read_text() if results.exists() else "# Benchmark results\n\n"
    if begin in text and end in text:
        text = text[:text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    write_text(results, text)


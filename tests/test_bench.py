"""Smoke tests of the benchmark scripts: they run and print well-formed lines (never wall times)."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINE = re.compile(r"^[a-z_0-9]+: .+ \d+(\.\d+)?x$")


def run(*args, timeout=240):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def bench_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if line and not line.startswith("#")]


def test_run_quick_cheap_benchmarks():
    out = run("bench/run.py", "--quick", "--only", "cider_reward")
    assert out.startswith("# ") and "cores" in out.splitlines()[0]  # the machine header
    lines = bench_lines(out)
    assert [line.split(":")[0] for line in lines] == ["cider_reward"]
    for line in lines:
        assert LINE.match(line), line


def test_run_lists_every_benchmark():
    names = run("bench/run.py", "--list").split()
    for name in ("cider", "cider_reward", "beam", "features", "dico_step", "demo_clip_step", "text_embed",
                 "load_evaluator", "scaling_beam", "scaling_dico_step"):
        assert name in names


def test_record_replaces_its_block(tmp_path, monkeypatch):
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("dico_bench_run", ROOT / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)

    results = tmp_path / "RESULTS.md"
    results.write_text("# Benchmark results\n\nprose above\n")
    monkeypatch.setattr(bench_run, "RESULTS", results)
    bench_run.record(["cider: a vs b 12.0x"], "machine one", False, 60)
    bench_run.record(["cider: a vs b 13.0x"], "machine two", False, 60)
    text = results.read_text()
    assert "prose above" in text and "13.0x" in text and "machine two" in text
    assert "12.0x" not in text and text.count(bench_run.BEGIN) == 1


def test_gpu_script_degrades_without_cuda_and_plans():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the no-GPU path cannot be exercised")
    out = run("bench/gpu.py", "--all", timeout=120)
    assert "no CUDA device" in out
    plan = run("bench/gpu.py", "--dry-run", timeout=60)
    assert "ViT-L-14" in plan and "64 x 8 captions/step" in plan and "vocabulary 49409" in plan


def test_gpu_script_smoke_runs_every_section_and_writes_its_table(tmp_path):
    """`bench/gpu.py --smoke`: the --all sections on the CPU with tiny models, through the same code,
    the CLI smoke included (torchrun --nproc_per_node=1 -m dico train xe, then dico, 3 steps each)."""
    import json

    out = run("bench/gpu.py", "--smoke", "--json", str(tmp_path / "gpu.json"), timeout=400)
    result = json.loads((tmp_path / "gpu.json").read_text())
    assert result["failed"] == [] and result["device"] == "cpu" and result["sizes"]["name"] == "smoke"
    sections = [r["section"] for r in result["rows"]]
    assert sections == ["vit"] * 4 + ["xe", "dico", "beam", "beam", "nccl", "nccl", "nccl"], sections  # fp16, bf16 autocast; bf16, fp16 weights
    for r in result["rows"]:
        assert r["value"] > 0 and r["unit"], r
    train = [r for r in result["rows"] if r["metric"].startswith("torchrun --nproc_per_node=1 -m dico train")]
    assert [r["metric"].split()[-1] for r in train] == ["xe", "dico"]
    assert all(r["detail"].startswith("3 steps, device cpu, 1 process(es)") for r in train), train
    table = out[out.index("section  what"):]  # the printed table: a header and one line per row
    assert len([line for line in table.splitlines() if line and not line.startswith("#")]) == 1 + len(sections)


def test_benchmark_lines_pass_the_format_check_of_run_py(monkeypatch):
    """The line each benchmark prints goes through bench/run.py's own format check (LINE): with the
    timing helpers returning fixed numbers, so only the lines are built (the cheap benchmarks here;
    `python bench/run.py --quick` runs them all for real and applies the same check; demo_clip_step's
    line used to fail it)."""
    import importlib.util

    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    monkeypatch.setenv("TQDM_DISABLE", "1")
    import common

    monkeypatch.setattr(common, "interleaved", lambda fns, repeats, warmup=1: {n: 0.1 * (i + 1) for i, n in
                                                                               enumerate(fns)})
    monkeypatch.setattr(common, "timed", lambda fn: 0.05)
    spec = importlib.util.spec_from_file_location("dico_bench_run", ROOT / "bench" / "run.py")
    bench_run = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench_run)
    for name in ("cider", "demo_clip_step", "load_evaluator", "scaling_beam"):  # the cheap ones: ~10 s
        for line in bench_run.ALL[name](True):
            assert bench_run.LINE.match(line), f"{name}: malformed benchmark line: {line!r}"

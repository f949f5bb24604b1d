"""Speed benchmarks of dico's fast paths, each against its slow baseline in the same process.

    python bench/run.py                      # everything + scaling sweeps; records bench/RESULTS.md
    python bench/run.py --quick              # small sizes, main benchmarks only (< 5 min on 2 cores)
    python bench/run.py --only beam cider    # some of them (names below)
    python bench/run.py --list

One line per benchmark, `name: <what was compared> <ratio>x`: both sides run in this process,
interleaved over several repetitions; the ratio is baseline median / fast median. Other jobs on a
shared machine change absolute times a lot; the ratios hold. --threads (default 1) pins torch's
intra-op threads: on a loaded 2-core machine 2 OpenMP threads lose far more to preemption than they
gain. A full run (no --quick, no --only) replaces its block in bench/RESULTS.md (--no-record: don't).
"""
from __future__ import annotations

import argparse
import importlib
import os
import re
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # cache_features' progress bar
sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402  (puts the repo root on sys.path)
from common import record_block  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN, END = "<!-- bench/run.py: begin (generated; edited by hand at your own risk) -->", "<!-- bench/run.py: end -->"
LINE = re.compile(r"^[a-z_0-9]+: .+ \d+(\.\d+)?x$")


def _lazy(module: str, name: str):
    """bench function `module.name`, imported only when run (the modules import torch, open_clip ...);
    its result as a list of lines."""
    def run(quick):
        out = getattr(importlib.import_module(module), name)(quick)
        return out if isinstance(out, list) else [out]
    return run


def _scaling_cider(quick):
    from cider_bench import bench_cider, bench_cider_reward

    sizes = (500, 1000) if quick else (1000, 5000)
    lines = [bench_cider(quick, n_images=n, repeats=3).replace("cider:", f"scaling_cider_{n}:", 1) for n in sizes]
    for b in (50, 200):  # per-step cost vs candidates; 10k-image train corpus (quick sizes) to save time
        lines.append(bench_cider_reward(True, batch_images=b).replace("cider_reward:", f"scaling_cider_reward_{b}:", 1))
    return lines


MAIN = {"cider": _lazy("cider_bench", "bench_cider"), "cider_reward": _lazy("cider_bench", "bench_cider_reward"),
        "beam": _lazy("decode_bench", "bench_beam"), "beam_styles": _lazy("decode_bench", "bench_beam_styles"),
        "features": _lazy("features_bench", "bench_features"),
        "jpeg_draft": _lazy("features_bench", "bench_jpeg_draft"), "dico_step": _lazy("step_bench", "bench_dico_step"),
        "demo_clip_step": _lazy("demo_bench", "bench_demo_clip_step"),
        "text_embed": _lazy("evaluator_bench", "bench_text_embed"),
        "load_evaluator": _lazy("evaluator_bench", "bench_load_evaluator")}
SCALING = {"scaling_cider": _scaling_cider, "scaling_beam": _lazy("decode_bench", "scaling_beam"),
           "scaling_features": _lazy("features_bench", "scaling_features"),
           "scaling_dico_step": _lazy("step_bench", "scaling_dico_step")}
ALL = {**MAIN, **SCALING}


def record(lines: list[str], header: str, quick: bool, seconds: float) -> None:
    """Replace the generated block of RESULTS.md (create the file if needed)."""
    record_block(RESULTS, BEGIN, END, f"python bench/run.py{' --quick' if quick else ''}", header, lines, seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small sizes; main benchmarks only unless --only names more")
    ap.add_argument("--only", nargs="+", metavar="NAME", choices=sorted(ALL), help="run these benchmarks")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--no-record", action="store_true", help="never write bench/RESULTS.md")
    ap.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    args = ap.parse_args(argv)
    if args.list:
        print("\n".join(ALL))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    names = args.only or (list(MAIN) if args.quick else list(ALL))
    header = common.describe_machine(common.machine_info())
    print(f"# {header}", flush=True)
    lines, failed, start = [], [], time.time()
    for name in names:
        try:
            for line in ALL[name](args.quick):
                assert LINE.match(line), f"malformed benchmark line: {line!r}"
                print(line, flush=True)
                lines.append(line)
        except Exception:  # keep going: one broken benchmark must not hide the others
            failed.append(name)
            traceback.print_exc()
            print(f"# {name}: FAILED (traceback on stderr)", flush=True)
    seconds = time.time() - start
    print(f"# {len(lines)} lines in {seconds:.0f} s" + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    if not (args.quick or args.only or args.no_record or failed):
        record(lines, header, args.quick, seconds)
        print(f"# recorded in {RESULTS}", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""What each stage costs at the paper's shapes on this CPU: seconds per unit and peak memory.

    python bench/paper_shapes.py                  # every stage (~10-20 min on 2 cores); records bench/RESULTS.md
    python bench/paper_shapes.py --only xe beam   # some (not recorded)

The stages are bench/gpu.py's sections on the CPU with the sizes `cpu-paper`: the paper's shapes
(random ViT-L/14, 257 x 1024 features, CLIP's 49,409-token vocabulary, the d=512 3 + 3-layer
captioner, beam 5 x length 30, k = 5, a random ViT-B/32 as the PAC-S reward) and the paper's batches,
with few repetitions. Each stage runs in a fresh process, so the peak RSS reported is that stage's own
(it includes ~0.5 GB of Python, torch and open_clip):
features  dico.features.cache_features of 16 COCO-like 640x480 JPEGs (1 decode worker, batch 4) -> s/image
xe        one XE optimiser step at the paper's batch: 64 captions per pass x 8 accumulation, one
          (image, caption) pair per sample (captions_per_image null) -> s/step
dico      DiCO steps of 8 images x k = 5 (the official 8 images per GPU) -> s/step
beam      beam search of 64 images (decoding.batch_size), 29 steps forced -> s/call
The figure to read is CPU seconds per unit (user + system of the stage's process and its DataLoader
workers): with torch at --threads 1 (the default) it is the work itself, nearly independent of what
other jobs on a shared machine take; the wall time per unit is printed next to it (the load average
at the start is in the header). On an idle 2-core machine at 2 threads, wall ~ CPU s / 1.6-1.9.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402
from common import record_block  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
BEGIN = "<!-- bench/paper_shapes.py: begin (generated; edited by hand at your own risk) -->"
END = "<!-- bench/paper_shapes.py: end -->"
STAGES = ("features", "xe", "dico", "beam")


def run_stage(stage: str, threads: int, tmp: Path) -> dict:
    """bench/gpu.py --only <stage> on the CPU in a fresh process: its rows and the wall time."""
    out = tmp / f"{stage}.json"
    cmd = [sys.executable, str(Path(__file__).with_name("gpu.py")), "--device", "cpu", "--sizes", "cpu-paper",
           "--only", stage, "--threads", str(threads), "--workers", "1", "--json", str(out)]
    t = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
    return {"rows": json.loads(out.read_text())["rows"], "wall_s": time.time() - t}


UNIT = {"img/s": "image", "steps/s": "step", "images/s": "image"}


def lines_of(results: dict) -> list[str]:
    """One line per row: CPU seconds per unit (the work, nearly load-independent at 1 thread), the
    wall seconds per unit it took here, peak RSS, the process's wall time, the row's details."""
    out = []
    for stage, res in results.items():
        for r in res["rows"]:
            unit = UNIT[r["unit"]]
            out.append(f"{stage}: {r['metric']}: {r['cpu_s']:.2f} CPU s/{unit} ({1 / r['value']:.2f} s/{unit} wall), "
                       f"peak RSS {r['peak_gib']:.2f} GiB (process {res['wall_s']:.0f} s); {r['detail']}")
    return out


def record(lines: list[str], header: str, seconds: float) -> None:
    record_block(RESULTS, BEGIN, END, "python bench/paper_shapes.py", header, lines, seconds)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="+", choices=STAGES, help="run these stages (the result is not recorded)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads per stage (default 1)")
    ap.add_argument("--no-record", action="store_true", help="never write bench/RESULTS.md")
    args = ap.parse_args(argv)
    header = common.describe_machine(common.machine_info()) + f"; stages at {args.threads} torch thread(s)"
    print(f"# {header}", flush=True)
    start, results = time.time(), {}
    with tempfile.TemporaryDirectory(prefix="dico-paper-shapes-") as tmp:
        for stage in args.only or STAGES:
            results[stage] = run_stage(stage, args.threads, Path(tmp))
            for line in lines_of({stage: results[stage]}):
                print(line, flush=True)
    seconds = time.time() - start
    if not (args.only or args.no_record):
        record(lines_of(results), header, seconds)
        print(f"# recorded in {RESULTS}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

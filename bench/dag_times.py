"""Per-stage wall times of a Snakemake run, from its log (`.snakemake/log/<date>.snakemake.log`).

    python bench/dag_times.py                      # the newest log under ./.snakemake/log
    python bench/dag_times.py path/to/x.snakemake.log [--markdown]

Prints, per rule: the number of jobs, the min / max / sum of their wall seconds (start to finish as
Snakemake logs them, so a job waiting for a core is not counted, but one sharing the cores is), and
the whole run's wall time (first start to last finish). This is how bench/RESULTS.md's demo-DAG
table is measured.
"""
from __future__ import annotations

import argparse
import re
import sys
from datetime import datetime
from pathlib import Path

STAMP = re.compile(r"^\[(\w{3} \w{3} +\d+ \d\d:\d\d:\d\d \d{4})\]$")
START = re.compile(r"^(?:local)?rule (\w+):$")
JOBID = re.compile(r"^\s+jobid: (\d+)$")
FINISHED = re.compile(r"^Finished jobid: (\d+) \(Rule: (\w+)\)$")


def job_times(lines) -> tuple[dict[str, list[float]], float]:
    """({rule: [wall seconds of each job]}, whole-run wall seconds) from a Snakemake log's lines."""
    now, rule, started, per_rule = None, None, {}, {}
    first = last = None
    for line in lines:
        line = line.rstrip("\n")
        if m := STAMP.match(line):
            now = datetime.strptime(" ".join(m[1].split()), "%a %b %d %H:%M:%S %Y")
            first = first or now
        elif m := START.match(line):
            rule = m[1]
        elif (m := JOBID.match(line)) and rule:
            started[m[1]] = (rule, now)
            rule = None
        elif m := FINISHED.match(line):
            name, t0 = started.pop(m[1], (m[2], now))
            per_rule.setdefault(name, []).append((now - t0).total_seconds())
            last = now
    total = (last - first).total_seconds() if first and last else 0.0
    return per_rule, total


def newest_log(root: Path = Path(".")) -> Path:
    logs = sorted((root / ".snakemake" / "log").glob("*.snakemake.log"))
    if not logs:
        sys.exit(f"no Snakemake log under {root / '.snakemake' / 'log'}: run snakemake first, or pass a log file")
    return logs[-1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("log", nargs="?", type=Path)
    ap.add_argument("--markdown", action="store_true", help="a Markdown table instead of plain text")
    args = ap.parse_args(argv)
    path = args.log or newest_log()
    per_rule, total = job_times(path.read_text().splitlines())
    rows = sorted(per_rule.items(), key=lambda kv: -sum(kv[1]))
    if args.markdown:
        print("| rule | jobs | min s | max s | sum s |\n|---|---:|---:|---:|---:|")
        for name, t in rows:
            print(f"| `{name}` | {len(t)} | {min(t):.0f} | {max(t):.0f} | {sum(t):.0f} |")
        print(f"| whole run | {sum(len(t) for t in per_rule.values())} | | | {total:.0f} wall |")
        return
    print(f"{path.name}: {sum(len(t) for t in per_rule.values())} jobs, {total:.0f} s wall ({total / 60:.1f} min)")
    for name, t in rows:
        print(f"  {name:24s} {len(t):3d} jobs  {min(t):6.0f} - {max(t):6.0f} s  sum {sum(t):7.0f} s")


if __name__ == "__main__":
    main()

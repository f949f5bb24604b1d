"""`dico doctor`: one table of what the configured run needs and whether this machine has it (exit 1
with the fixes when it does not)."""
from __future__ import annotations

import argparse
import sys

from .common import command


def cmd_doctor(args):
    from .. import doctor

    profile, path = (None, None)
    if args.profile:
        path, profile = doctor.read_profile(args.profile)
    config, files = doctor.load_config(args.configfile, profile)
    print(f"dico doctor: config {' + '.join(files)}" + (f", profile {path}" if path else ""), flush=True)
    rows = doctor.run_checks(config, profile, path, quick=args.quick,
                             snakemake=doctor.snakemake_command(args.configfile, args.profile))
    print(doctor.format_table(rows))
    failed = [r for r in rows if r.status == "FAIL"]
    print(f"\n{len(failed)} of {len(rows)} checks failed" if failed else f"\nall {len(rows)} checks passed "
          "(or skipped, with the reason)")
    if failed:
        sys.exit(1)


def register(subparsers) -> argparse.ArgumentParser:
    """Add `doctor` to the `dico` parser."""
    p = command(subparsers, "doctor", "check this machine against a config before a run (driver, GPUs, Java, "
                "disk, downloads, SLURM)", cmd_doctor,
                description="Print one table of what the configured run needs (torch's CUDA build against the "
                "driver, GPUs, a NCCL group, fp16, Java, the SPICE jars, free disk, each download and its "
                "sha256, the SLURM profile's names) and whether this machine has it; exit 1 with the fixes "
                "when it does not. Run it from the repository root, on a GPU node for the paper.")
    p.add_argument("--configfile", nargs="+", action="extend", metavar="FILE",
                   help="config files, merged in order as by snakemake (default: the profile's configfile, "
                   "else config/config.yaml)")
    p.add_argument("--profile", metavar="NAME", help="a profile folder holding profile.yaml (slurm, workstation)")
    p.add_argument("--quick", action="store_true", help="check downloads by presence and size, not sha256")
    return p

"""`dico <step>`: every pipeline step runnable by hand; the Snakefile's rules call exactly these.

Each step reads the settings it needs either from `--spec-json` (what the Snakefile passes: the
resolved, validated slice of the config, see dico.config.*_spec) or from `--config FILE` (by hand;
validated against the same schema). Paths of inputs and outputs are explicit arguments.

    dico make-demo-data --out-dir results/data/demo
    dico train xe --splits results/data/splits.json --features-train ... --out-model ...
    dico evaluate --captions my_captions.json --refs dataset_coco.json --images coco/val2014 ...

This package parses and dispatches: one module per command family, each with `register(sub)` adding
its sub-commands and a `cmd_*` per command that turns the arguments into one library call.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys

from .. import config as C
from . import data, download, evaluate, generate, models, official, report, score, train

log = logging.getLogger("dico")

# the order of `dico --help`: the pipeline's stages, then the tools around it
FAMILIES = (data, models, train, generate, evaluate, report, score, download, official)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dico", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except C.ConfigError as e:
        log.error("%s", e)
        return 2
    except SystemExit as e:  # runtime.Preempted after SIGTERM: the checkpoint is saved; say so, keep 143
        if e.code == 143 and e.args:
            log.warning("%s", e.args[0])
        raise
    except (FileNotFoundError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("DICO_TRACEBACK"):
            raise
        log.error("%s: %s", type(e).__name__, e)
        log.error("(set DICO_TRACEBACK=1 for the full traceback)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

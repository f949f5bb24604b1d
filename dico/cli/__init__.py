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
import errno
import logging
import os
import sys

from .. import __version__
from .. import config as C
from ..io import InputError
from . import caption, data, doctor, download, evaluate, generate, gpu, models, official, report, score, train

log = logging.getLogger("dico")

# the order of `dico --help`: the pipeline's stages, then the tools around it
FAMILIES = (data, models, train, generate, evaluate, report, score, caption, download, official, gpu, doctor)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dico", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"dico {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for family in FAMILIES:
        family.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command. The error boundary: a user's mistake (a path, a permission, a format, a value)
    is one line naming the file or flag and the fix, exit 1 (2 for the command line or the config);
    anything else is a bug of dico's: its traceback, a line saying so and where it is kept, exit 1."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        stream=sys.stderr)
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the usage of the command at hand, not the top-level one
        getattr(args, "parser", parser).error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        args.fn(args)
    except C.ConfigError as e:
        log.error("%s", e)
        return 2
    except SystemExit as e:  # runtime.Preempted after SIGTERM: the checkpoint is saved; say so, keep 143
        if e.code == 143 and e.args:
            log.warning("%s", e.args[0])
        raise
    except KeyboardInterrupt:
        log.error("interrupted (Ctrl-C): nothing half-written was kept; rerun the command to start again")
        return 130
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        if os.environ.get("DICO_TRACEBACK"):
            raise
        log.error("%s", user_error(e))
        log.error("(set DICO_TRACEBACK=1 for the full traceback)")
        return 1
    except Exception:  # noqa: BLE001  (not a user's mistake: ours)
        log.error("%s", bug_report(args))
        return 1
    return 0


def user_error(e: BaseException) -> str:
    """One line for an error a user can cause. An operating-system error names its path and the fix."""
    if isinstance(e, OSError) and e.filename is not None:
        fixes = {errno.EISDIR: "a folder was given where a file is expected",
                 errno.ENOTDIR: "a part of the path is a file, not a folder",
                 errno.EACCES: "permission denied: choose a path you can read and write",
                 errno.EPERM: "permission denied: choose a path you can read and write",
                 errno.EROFS: "read-only file system: choose a path you can write",
                 errno.ENOSPC: "no space left on the device: free some, or choose another disk",
                 errno.ENOENT: "no such file or folder: check the path"}
        return f"{e.filename}: {fixes.get(e.errno, e.strerror or type(e).__name__)}"
    if isinstance(e, KeyError):
        return f"KeyError: {e.args[0] if e.args else e}"
    return f"{type(e).__name__}: {e}" if not isinstance(e, InputError) else str(e)


def bug_report(args) -> str:
    """The traceback of an unexpected error, kept in a file (printed too), and a line saying it is a bug."""
    import tempfile
    import traceback

    text = traceback.format_exc()
    sys.stderr.write(text)
    with tempfile.NamedTemporaryFile("w", prefix="dico-bug-", suffix=".log", delete=False) as f:
        f.write(f"dico {__version__} {args.command}\n{text}")
    return (f"this is a bug in dico, not in what you gave it: please report it with the traceback above "
            f"(kept in {f.name})")

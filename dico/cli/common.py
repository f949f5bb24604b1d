"""What the `dico` commands share: the step settings (`--spec-json` / `--config`), per-split argument
lists, NAME=PATH arguments and the device."""
from __future__ import annotations

import argparse
import json

from .. import config as C


def add_common(p: argparse.ArgumentParser) -> None:
    """--config, --spec-json and --threads of a pipeline step."""
    p.add_argument("--config", default="config/config.yaml", help="config YAML (ignored with --spec-json)")
    p.add_argument("--spec-json", help="resolved settings of this step (as the Snakefile passes them)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")


def step_spec(args, make) -> dict:
    """The step's settings: --spec-json as the Snakefile passes it, else `make(config)` of --config."""
    if args.spec_json:
        return json.loads(args.spec_json)
    return make(C.load(args.config))


def device(name: str) -> str:
    from ..runtime import select_device

    return select_device(name)


def per_split(args, *names, runs: int = 1) -> list[dict]:
    """--split S [S ...] with one --<name> per split, in the same order; with several runs (one job
    for all runs, evaluate.group_runs), one per run and split, run-major: r1/S1, r1/S2, r2/S1, ..."""
    n = runs * len(args.split)
    for name in names:
        values = getattr(args, name)
        if len(values) != n:
            per = "per --split" if runs == 1 else f"per run and split ({runs} runs x {len(args.split)} splits)"
            raise SystemExit(f"give one --{name.replace('_', '-')} {per}: expected {n}, got {len(values)} "
                             f"--{name.replace('_', '-')}")
    rows = zip(args.split * runs, *(getattr(args, n) for n in names))
    return [{"index": i // len(args.split), **dict(zip(("split", *names), row))} for i, row in enumerate(rows)]


def check_outputs(args, *names: str, folders: tuple[str, ...] = ()) -> None:
    """Before any work: every output the command was given (--<name>, one path or a list; --<folder>, a
    folder) can be written (dico.io.check_output), so a typo fails at once and not after the work."""
    from ..io import check_output

    for name in (*names, *folders):
        values = getattr(args, name, None)
        for value in values if isinstance(values, list) else [values]:
            if value:
                check_output(value, "--" + name.replace("_", "-"), folder=name in folders)


def parse_named(values: list[str] | None, what: str) -> dict[str, str]:
    """NAME=PATH arguments (--clip-model, --embeddings) -> {NAME: PATH}."""
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep:
            raise SystemExit(f"--{what} expects NAME=PATH, got {v!r}")
        out[name] = path
    return out


def load_clip(spec: dict, path: str | None = None, device: str = "cpu"):
    """The clip_models entry `spec` as an Evaluator, from `path` (NAME=PATH given) or its configured path."""
    from ..clip_weights import load_evaluator

    return load_evaluator(path or spec["path"], format=spec.get("format", "openai"), arch=spec.get("arch"),
                          device=device)


def command(sub, name: str, help: str, fn=None, description: str | None = None) -> argparse.ArgumentParser:
    """One sub-command: its line in `dico --help`, what its own --help says it does, and the function it
    runs (every family registers its commands through this one helper)."""
    p = sub.add_parser(name, help=help, description=description or help[:1].upper() + help[1:] + ".")
    if fn is not None:
        p.set_defaults(fn=fn, parser=p)
    return p

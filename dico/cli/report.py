"""`dico report <target>`: one sub-command per table and figure, each with explicit input files, so that a
Snakemake rule depends on exactly the files its target reads."""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from .. import config as C
from ..report.inputs import dataset_name, load_metrics, load_reported
from ..report.figures import figure_ablations, figure_qualitative, figure_tradeoff, figure_training_curves
from ..report.table import write_table
from ..report.tables import ablation_table, main_table, ood_table
from .common import check_outputs, command, step_spec

log = logging.getLogger("dico")


def _report_spec(args) -> dict:
    return step_spec(args, C.report_spec)


def _by_run(paths: list[str], what: str) -> dict[str, str]:
    """results/<what>/<run>/<file>: the run is the parent folder (train logs, captions)."""
    out = {}
    for p in paths:
        run = Path(p).parent.name
        if run in out:
            raise ValueError(f"two {what} files for run {run!r}: {out[run]} and {p}")
        out[run] = p
    return out


def cmd_table_main(args):
    check_outputs(args, "out")
    spec = _report_spec(args)
    table = main_table(load_metrics(args.metrics), spec, load_reported(args.reported), dataset_name(args.splits))
    write_table(table, args.out, "dico report table-main", args.reported, [args.splits] if args.splits else [])
    log.info("main table: %d rows -> %s", len(table.rows), args.out)


def cmd_table_ablation(args):
    check_outputs(args, "out")
    spec = _report_spec(args)
    table = ablation_table(args.ablation, load_metrics(args.metrics), spec, load_reported(args.reported),
                           dataset_name(args.splits))
    write_table(table, args.out, f"dico report table-ablation --ablation {args.ablation}", args.reported,
                [args.splits] if args.splits else [])
    log.info("ablation %s table: %d rows -> %s", args.ablation, len(table.rows), args.out)


def cmd_table_ood(args):
    check_outputs(args, "out")
    spec = step_spec(args, C.ood_report_spec)
    per_set: dict[str, list[str]] = {}
    for item in args.metrics:
        name, sep, path = item.partition("=")
        if not sep:
            raise SystemExit(f"--metrics expects SET=PATH (evaluation set name = metrics JSON), got {item!r}")
        per_set.setdefault(name, []).append(path)
    metrics = {name: load_metrics(paths) for name, paths in per_set.items()}
    table = ood_table(metrics, spec, load_reported(args.reported))
    write_table(table, args.out, "dico report table-ood", args.reported)
    log.info("ood table: %d rows x %d sets -> %s", len(table.rows), len(metrics), args.out)


def cmd_figure_training_curves(args):
    check_outputs(args, "out")
    figure_training_curves(_by_run(args.logs, "train log"), args.out, _report_spec(args))
    log.info("training curves -> %s", args.out)


def cmd_figure_tradeoff(args):
    check_outputs(args, "out")
    figure_tradeoff(load_metrics(args.metrics), args.out, _report_spec(args))
    log.info("trade-off figure -> %s", args.out)


def cmd_figure_ablations(args):
    check_outputs(args, "out")
    figure_ablations(load_metrics(args.metrics), args.out, _report_spec(args))
    log.info("ablations figure -> %s", args.out)


def cmd_figure_qualitative(args):
    check_outputs(args, "out")
    spec = _report_spec(args)
    n = args.n_images or spec.get("report", {}).get("qualitative_images", 6)
    figure_qualitative(_by_run(args.captions, "captions"), args.splits, args.out, n, spec)
    log.info("qualitative figure (%d images) -> %s", n, args.out)


def _target(sub, name: str, help: str, fn, out_help: str):
    p = command(sub, name, help, fn)
    p.add_argument("--config", default="config/config.yaml", help="config YAML (ignored with --spec-json)")
    p.add_argument("--spec-json", help="dico.config.report_spec (or a slice of it), as the Snakefile passes it")
    p.add_argument("--out", required=True, help=out_help)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add `report` with one sub-command per table and figure to the `dico` parser."""
    parser = command(subparsers, "report", "LaTeX tables and figures from metrics, logs and captions",
                     description="The paper's tables (booktabs LaTeX, a CSV twin, provenance) and figures (PDF, "
                     "PNG, provenance), one TARGET each, from the metrics files, training logs and captions.")
    sub = parser.add_subparsers(dest="report_target", required=True, metavar="TARGET")
    tex = "the .tex to write (the .csv twin and .provenance.json go beside it)"
    pdf = "the .pdf to write (the .png and .provenance.json go beside it)"

    p = _target(sub, "table-main", "main table: XE, SCST, DiCO on the test split", cmd_table_main, tex)
    p.add_argument("--metrics", nargs="+", required=True, help="test metrics JSONs (several per run = seeds)")
    p.add_argument("--splits", help="split file (names the data set in the caption)")
    p.add_argument("--reported", help="YAML of the paper's numbers (config/paper_reported.yaml)")

    p = _target(sub, "table-ablation", "one ablation table (beta, tau, k, reward)", cmd_table_ablation, tex)
    p.add_argument("--ablation", required=True, help="ablations entry of the config")
    p.add_argument("--metrics", nargs="+", required=True, help="test metrics JSONs of the ablation's runs")
    p.add_argument("--splits", help="split file (names the data set in the caption)")
    p.add_argument("--reported", help="YAML of the paper's numbers")

    p = _target(sub, "table-ood", "out-of-domain table: runs x one column group per evaluation set", cmd_table_ood,
                tex)
    p.add_argument("--metrics", nargs="*", default=[], help="SET=PATH per metrics JSON of a run on evaluation set "
                   "SET (results/metrics/<run>/ood/<SET>.json); several per run and set = seeds")
    p.add_argument("--reported", help="YAML of the paper's numbers (section ood, columns SET:C, SET:S, ...)")

    p = _target(sub, "figure-training-curves", "loss and validation metrics vs step per run",
                cmd_figure_training_curves, pdf)
    p.add_argument("--logs", nargs="+", required=True, help="results/runs/<run>/train_log.jsonl files")

    p = _target(sub, "figure-tradeoff", "PAC-S and CLIP-S vs CIDEr on test, one point per run",
                cmd_figure_tradeoff, pdf)
    p.add_argument("--metrics", nargs="+", required=True, help="test metrics JSONs")

    p = _target(sub, "figure-ablations", "CIDEr and PAC-S vs each ablated value", cmd_figure_ablations, pdf)
    p.add_argument("--metrics", nargs="*", default=[], help="test metrics JSONs of the ablation runs (none: "
                   "a figure saying so, for a config without ablations)")

    p = _target(sub, "figure-qualitative", "test images with every run's caption", cmd_figure_qualitative, pdf)
    p.add_argument("--captions", nargs="+", required=True, help="results/captions/<run>/test.json files")
    p.add_argument("--splits", required=True, help="split file (test images and references)")
    p.add_argument("--n-images", type=int, help="default: report.qualitative_images of the spec")
    return parser

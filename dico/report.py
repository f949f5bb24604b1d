"""The paper's tables and figures, from the metrics files, training logs and captions.

Tables are booktabs LaTeX with a CSV twin (same stem) and a `<stem>.provenance.json`; scores are
printed x100 with one decimal, the best per column in bold, a missing metric as "--" with a note
giving the reason. A row is a list of metrics files (one per seed): several seeds print mean ± std.
Where config/paper_reported.yaml has the paper's number, the cell adds reproduced - reported.

The out-of-domain table (`ood`, config evaluate.datasets) has the runs as rows and one column group
per extra evaluation set: C and S (the columns nocaps' evaluation and Flickr30k results report) and
CLIP-S, PAC-S, RefPAC-S (the reference-free and PAC-based scores DiCO is about).

Figures (matplotlib, PDF + PNG + provenance): training curves, the PAC-S/CLIP-S vs CIDEr trade-off,
the ablations and a qualitative panel.

`register(subparsers)` adds `dico report <target>`, one sub-command per table or figure, each with
explicit input files, so that a Snakemake rule depends on exactly the files its target reads.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import re
import statistics
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

from .io import atomic_path, git_commit, read_json, write_json, write_text

log = logging.getLogger("dico")

# (column label as printed, key in the metrics JSON)
MAIN_COLUMNS = [("B-4", "BLEU-4"), ("M", "METEOR"), ("R", "ROUGE-L"), ("C", "CIDEr"), ("S", "SPICE"),
                ("CLIP-S", "CLIP-S"), ("RefCLIP-S", "RefCLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]
ABLATION_COLUMNS = [("B-4", "BLEU-4"), ("M", "METEOR"), ("C", "CIDEr"), ("CLIP-S", "CLIP-S"),
                    ("RefCLIP-S", "RefCLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]
OOD_COLUMNS = [("C", "CIDEr"), ("S", "SPICE"), ("CLIP-S", "CLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]
REWARD_LABELS = {"cider": "CIDEr", "clip_s": "CLIP-S", "pac_s": "PAC-S"}
# Math mode, so the same label works in LaTeX and in matplotlib's mathtext.
ABLATION_SYMBOLS = {"beta": r"$\beta$", "tau": r"$\tau$", "k": r"$k$", "reward": "reward"}


# -- loading -------------------------------------------------------------------------------------
def load_metrics(paths) -> list[dict]:
    """Metrics JSONs, each with the path it came from (for provenance)."""
    out = []
    for p in paths:
        m = read_json(p)
        if not isinstance(m, dict) or "metrics" not in m:
            raise ValueError(f"{p}: not a metrics file (no 'metrics' key); produce it with `dico evaluate`")
        m.setdefault("run", Path(p).parent.name)
        out.append({**m, "path": str(p)})
    return out


def base_run(run: str) -> str:
    """`dico_seed2` -> `dico`: seeds of one run are one row (the names dico.config gives them)."""
    from .config import SEEDED_RUN

    m = SEEDED_RUN.match(run)
    return m["base"] if m else run


def group_by_run(metrics: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for m in metrics:
        groups.setdefault(base_run(m["run"]), []).append(m)
    return groups


def load_reported(path) -> dict:
    """{table: {row key: {column: value or None}}} from the reported-numbers YAML (values x100)."""
    import yaml

    if not path:
        return {}
    raw = yaml.safe_load(Path(path).read_text()) or {}
    tables = raw.get("tables") or {}
    if not isinstance(tables, dict):
        raise ValueError(f"{path}: 'tables' must map table name -> row -> column -> number")
    # YAML reads `0.05:` as a float and `1:` as an int; rows are keyed like dico.config formats values.
    return {t: {row_key(r): dict(cols or {}) for r, cols in (rows or {}).items()} for t, rows in tables.items()}


def row_key(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def dataset_name(splits_path) -> str | None:
    return read_json(splits_path).get("dataset") if splits_path else None


# -- labels --------------------------------------------------------------------------------------
def latex_escape(text: str) -> str:
    table = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
             "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}
    return "".join(table.get(c, c) for c in str(text))


def reward_label(reward: str) -> str:
    return REWARD_LABELS.get(reward, reward)


def run_label(run: str, latex: bool = True) -> str:
    """XE, SCST (CIDEr), DiCO, DiCO ($\\beta$=0.05): valid LaTeX (latex=True) or mathtext."""
    run = base_run(run)
    esc = latex_escape if latex else str
    if run == "xe":
        return "XE"
    if run == "dico":
        return "DiCO"
    if run.startswith("scst_"):
        return f"SCST ({esc(reward_label(run[5:]))})"
    m = re.fullmatch(r"dico_([a-z]+)-(.+)", run)
    if m:
        name, value = m.groups()
        value = reward_label(value) if name == "reward" else value
        return f"DiCO ({ABLATION_SYMBOLS.get(name, esc(name))}={esc(value)})"
    return esc(run)


def run_order(runs, scst_rewards=()) -> list[str]:
    """The paper's row order: XE, SCST per reward, DiCO, then anything else in input order."""
    canon = ["xe"] + [f"scst_{r}" for r in scst_rewards] + ["dico"]
    runs = list(dict.fromkeys(runs))
    return [r for r in canon if r in runs] + [r for r in runs if r not in canon]


def ablation_values(name: str, spec: dict) -> list[str]:
    """Configured values of one ablation: numbers sorted numerically, others in config order."""
    values = list(spec["ablations"][name])
    try:
        return sorted(values, key=float)
    except ValueError:
        return values


def default_value(name: str, spec: dict) -> str | None:
    return row_key(spec["dico"][name]) if name in spec.get("dico", {}) else None


# -- tables --------------------------------------------------------------------------------------
@dataclass
class Cell:
    values: list[float]              # x100, one per seed that has the metric
    reason: str | None = None        # why the metric is missing (when values is empty)
    reported: float | None = None    # the paper's number, x100
    note_label: str | None = None    # what the missing-value note names (default: the column's metric)

    @property
    def mean(self):
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self):
        # Sample std across seeds; a single seed has none (not 0, which would claim precision).
        return statistics.stdev(self.values) if len(self.values) > 1 else None

    @property
    def delta(self):
        return None if self.mean is None or self.reported is None else self.mean - self.reported


@dataclass
class Row:
    key: str                 # run name (main) or ablation value: the key in the reported YAML
    label: str               # LaTeX
    cells: dict[str, Cell]
    sources: list[dict]      # the metrics dicts of this row (one per seed)


@dataclass
class Table:
    name: str                # file stem and section of the reported YAML: main, ablation_beta, ...
    caption: str
    row_header: str
    columns: list[str]
    rows: list[Row]
    keys: dict[str, str]     # column label -> metric name (B-4 -> BLEU-4), for notes
    notes: list[str] = field(default_factory=list)
    groups: list[tuple[str, int]] = field(default_factory=list)  # (LaTeX title, columns) spanning the header
    headers: dict[str, str] = field(default_factory=dict)         # column -> printed header (default: itself)


def summarise(metrics: list[dict], key: str, reported=None) -> Cell:
    values = [m["metrics"].get(key) for m in metrics]
    present = [100.0 * v for v in values if v is not None and not math.isnan(v)]
    reason = None
    if not present:
        reasons = [(m.get("reasons") or {}).get(key) for m in metrics]
        reason = table_reason(next((r for r in reasons if r), "not computed"))
    return Cell(present, reason, None if reported is None else float(reported))


_ABS_PATH = re.compile(r"(?<![\w.~])/(?:[^\s/;,()'\"]+/)*[^\s/;,()'\"]+")


def table_reason(reason: str) -> str:
    """What a table's footnote says of a missing value: a reason's first part, before "; " (the rest —
    where a file was looked for, how to fix it — is for the log and the metrics JSON; a reader of the
    paper needs "SPICE: not computed (Stanford CoreNLP 3.6.0 jars missing)"), without machine paths."""
    return portable(str(reason).split("; ", 1)[0])


def portable(text: str) -> str:
    """`text` without this machine's absolute paths (a table goes into a paper): a path inside a Python
    environment keeps its part from site-packages on, one under the working directory becomes relative,
    any other keeps its last three components (enough to tell results/metrics/<run>/<split>.json apart).
    The .provenance.json beside a table keeps the full paths."""
    import os

    cwd = os.getcwd().rstrip("/") + "/"

    def shorten(m):
        path = m.group(0)
        if "/site-packages/" in path:
            return "<site-packages>/" + path.split("/site-packages/", 1)[1]
        if path.startswith(cwd):
            return path[len(cwd):]
        return ".../" + "/".join(path.rsplit("/", 3)[1:])

    return _ABS_PATH.sub(shorten, str(text))


def make_table(name: str, caption: str, row_header: str, rows: list[tuple[str, str, list[dict]]],
               columns: list[tuple[str, str]], reported: dict | None = None) -> Table:
    """rows: (key, LaTeX label, metrics dicts of its seeds); reported: load_reported()'s dict."""
    section = (reported or {}).get(name, {})
    out = []
    for key, label, metrics in rows:
        if not metrics:
            raise ValueError(f"table {name}: row {key!r} has no metrics files")
        paper = section.get(key, {})
        unknown = set(paper) - {c for c, _ in columns}
        if unknown:  # a typo ("CIDEr" for "C") would silently drop the comparison
            raise ValueError(f"reported numbers, table {name} row {key!r}: unknown columns {sorted(unknown)} "
                             f"(columns: {', '.join(c for c, _ in columns)})")
        cells = {col: summarise(metrics, mkey, paper.get(col)) for col, mkey in columns}
        if all(best_step(m) == 0 for m in metrics):
            label += r"$^\ddagger$"
        out.append(Row(key, label, cells, metrics))
    table = Table(name, caption, row_header, [c for c, _ in columns], out, dict(columns))
    _note_kept_start(table)
    return table


def _note_kept_start(table: Table) -> None:
    if any(r.label.endswith(r"$^\ddagger$") for r in table.rows):
        # e.g. SCST on a CLIP reward selected by validation CIDEr: every later checkpoint scored lower,
        # so the row repeats its starting model. Say so instead of letting it pass for a result.
        table.notes.append(r"$^\ddagger$No validation improvement during fine-tuning: the selected checkpoint "
                           r"is the starting model (step 0); the training log shows the later steps.")


def best_step(metrics: dict) -> int | None:
    """Training step of the checkpoint these metrics were computed from (None when unknown)."""
    return ((metrics.get("provenance") or {}).get("run_provenance") or {}).get("best_step")


def best_per_column(table: Table) -> dict[str, float | None]:
    """Highest mean as printed (1 decimal), so printed ties are all bold; None when nothing stands
    out (fewer than two values, or all equal)."""
    best = {}
    for col in table.columns:
        shown = [round(r.cells[col].mean, 1) for r in table.rows if r.cells[col].mean is not None]
        best[col] = max(shown) if len(set(shown)) > 1 else None
    return best


def _missing_notes(table: Table) -> dict[tuple[str, str], str]:
    """A footnote letter for each distinct (metric, reason) of a missing value (SPICE missing for the
    same reason in several column groups shares one note)."""
    marks = {}
    for r in table.rows:
        for col in table.columns:
            cell = r.cells[col]
            key = (cell.note_label or table.keys[col], cell.reason)
            if cell.mean is None and key not in marks:
                marks[key] = "abcdefghijklmnopqrstuvwxyz"[len(marks) % 26]
    return marks


def cell_latex(cell: Cell, bold: bool, mark: str | None) -> str:
    if cell.mean is None:
        return "--" + (f"$^{{{mark}}}$" if mark else "")
    text = f"{cell.mean:.1f}"
    text = rf"\textbf{{{text}}}" if bold else text
    if cell.std is not None:
        text += rf"{{\scriptsize$\,\pm\,${cell.std:.1f}}}"
    if cell.delta is not None:
        text += rf" {{\scriptsize({cell.delta:+.1f})}}"
    return text


def to_latex(table: Table, header: list[str] = ()) -> str:
    best, marks = best_per_column(table), _missing_notes(table)
    lines = [f"% {h}" for h in header]
    lines += [r"\begin{table}[t]", r"\centering", rf"\caption{{{table.caption}}}",
              rf"\label{{tab:{table.name}}}", r"\begin{tabular}{l" + "c" * len(table.columns) + "}", r"\toprule"]
    if table.groups:  # a title over each group of columns, underlined across the group
        lines.append(" & ".join([""] + [rf"\multicolumn{{{n}}}{{c}}{{{title}}}" for title, n in table.groups]) + r" \\")
        starts = [2 + sum(n for _, n in table.groups[:i]) for i in range(len(table.groups))]
        lines.append(" ".join(rf"\cmidrule(lr){{{a}-{a + n - 1}}}" for a, (_, n) in zip(starts, table.groups)))
    lines += [" & ".join([table.row_header] + [latex_escape(table.headers.get(c, c)) for c in table.columns])
              + r" \\", r"\midrule"]
    for r in table.rows:
        cells = []
        for col in table.columns:
            c = r.cells[col]
            bold = c.mean is not None and best[col] is not None and round(c.mean, 1) == best[col]
            cells.append(cell_latex(c, bold, marks.get((c.note_label or table.keys[col], c.reason))))
        lines.append(" & ".join([r.label] + cells) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}"]
    notes = [rf"$^{{{m}}}${latex_escape(key)}: {latex_escape(reason)}" for (key, reason), m in marks.items()]
    for note in table.notes + notes:
        lines.append(rf"\par\smallskip{{\footnotesize {note}\par}}")
    lines.append(r"\end{table}")
    return "\n".join(lines) + "\n"


def to_frame(table: Table):
    """The CSV twin: the same numbers (x100, unrounded), with std / reported / delta columns where
    the .tex shows them, and the reason of every missing value."""
    import pandas as pd

    cells = [c for r in table.rows for c in r.cells.values()]
    with_std = any(c.std is not None for c in cells)
    with_paper = any(c.reported is not None for c in cells)
    records = []
    for r in table.rows:
        # a row's sources: one metrics file per seed (and, in table ood, per evaluation set)
        seeds = list({m["run"]: m for m in r.sources}.values())
        rec = {"row": r.key, "runs": ";".join(m["run"] for m in seeds), "seeds": len(seeds),
               "best_step": ";".join(str(best_step(m)) for m in seeds)}
        for col in table.columns:
            c = r.cells[col]
            rec[col] = _round(c.mean)
            if with_std:
                rec[f"{col}_std"] = _round(c.std)
            if with_paper:
                rec[f"{col}_reported"], rec[f"{col}_delta"] = c.reported, _round(c.delta)
        rec["notes"] = "; ".join(f"{table.keys[col]}: {r.cells[col].reason}" for col in table.columns
                                 if r.cells[col].mean is None)
        records.append(rec)
    return pd.DataFrame.from_records(records)


def _round(x):
    # Far below the printed precision; drops float noise such as 80.10000000000001.
    return None if x is None else round(x, 6)


def source_record(path, metrics: dict | None = None) -> dict:
    """One input of a table/figure: path, content hash and, for metrics, run/seed/commit."""
    rec = {"path": str(path), "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest()}
    if metrics is not None:
        prov = metrics.get("provenance") or {}
        run_prov = prov.get("run_provenance") or {}
        rec.update(run=metrics.get("run"), split=metrics.get("split"), git_commit=prov.get("git_commit"),
                   seed=run_prov.get("seed", prov.get("seed")), best_step=best_step(metrics))
    return rec


def provenance_path(out) -> Path:
    return Path(out).with_suffix(".provenance.json")


def write_table(table: Table, out_tex, command: str, reported_path=None, extra_inputs=()) -> dict:
    """.tex (with a provenance comment header), .csv twin and .provenance.json, each atomically."""
    out_tex = Path(out_tex)
    inputs = [source_record(m["path"], m) for r in table.rows for m in r.sources]
    inputs += [source_record(p) for p in [*extra_inputs, reported_path] if p]
    header = [f"{out_tex.name}: written by `{command}` (dico {git_commit() or 'unknown commit'}); "
              "do not edit, rebuild it.", "inputs (path, run, seed, git commit of its evaluation):"]
    header += [f"  {portable(i['path'])}  run={i.get('run', '-')} seed={i.get('seed', '-')} "
               f"commit={i.get('git_commit', '-')}" for i in inputs]
    write_text(out_tex, to_latex(table, header))
    write_text(out_tex.with_suffix(".csv"), to_frame(table).to_csv(index=False))
    prov = {"output": str(out_tex), "csv": str(out_tex.with_suffix(".csv")), "table": table.name,
            "command": command, "dico_git_commit": git_commit(), "reported": reported_path and str(reported_path),
            "inputs": inputs}
    write_json(provenance_path(out_tex), prov)
    return prov


def _scope_caption(dataset: str | None, metrics: list[dict]) -> str:
    splits = {m.get("split") for m in metrics}
    if len(splits) > 1:  # a val file among test files would make the table meaningless
        raise ValueError(f"metrics of several splits in one table: {sorted(map(str, splits))}")
    split = latex_escape(splits.pop() or "test") if splits else "test"
    n = metrics[0].get("n_images") if metrics else None
    images = f" ({n} images)" if n else ""
    if dataset == "demo":
        return (f"Reproduced on the embedded demo data (generated shapes, not COCO), {split} split{images}: "
                "numbers are not comparable to the paper's.")
    if dataset and dataset.lower().startswith("coco"):
        return f"Reproduced on COCO, Karpathy {split} split{images}."
    return f"Reproduced on {latex_escape(dataset or 'the data set')}, {split} split{images}."


def _scale_caption(table: Table) -> str:
    cells = [c for r in table.rows for c in r.cells.values()]
    text = r"Scores $\times$100; best per column in bold."
    if any(c.std is not None for c in cells):
        seeds = sorted({len(r.sources) for r in table.rows if len(r.sources) > 1})
        text += f" Mean $\\pm$ std over {'/'.join(map(str, seeds))} seeds."
    if any(c.delta is not None for c in cells):
        text += " In parentheses: reproduced minus the paper's reported value."
    return text


def main_table(metrics: list[dict], spec: dict, reported: dict | None = None, dataset: str | None = None) -> Table:
    """XE, SCST per reward, DiCO (whichever have metrics) on the test split, columns MAIN_COLUMNS."""
    groups = group_by_run(metrics)
    order = run_order(groups, spec.get("scst_rewards", []))
    rows = [(run, run_label(run), groups[run]) for run in order]
    table = make_table("main", "", "Method", rows, MAIN_COLUMNS, reported)
    table.caption = f"{_scope_caption(dataset, metrics)} {_scale_caption(table)}"
    _add_fluency(table)
    _note_selected_steps(table)
    return table


def _add_fluency(table: Table) -> None:
    """On a demo set (every row's metrics have diversity.fluent_pct): a last column "Fluent %", the share
    of captions the demo's grammar can produce. Already a percentage: not scaled."""
    if not all((m.get("diversity") or {}).get("fluent_pct") is not None for r in table.rows for m in r.sources):
        return
    for r in table.rows:
        r.cells["Fluent"] = Cell([float(m["diversity"]["fluent_pct"]) for m in r.sources])
    table.columns.append("Fluent")
    table.keys["Fluent"] = "fluent_pct"
    table.headers["Fluent"] = "Fluent %"  # escaped by to_latex
    table.notes.append(r"Fluent: \% of the captions the demo's caption grammar can produce "
                       r"(\texttt{dico.demo.grammatical}); a percentage, not scaled.")


def _note_selected_steps(table: Table) -> None:
    """Which checkpoint each row is (the training step selection picked, per seed), so a reader can
    tell a fine-tuned row from its starting model and find it in the training curves."""
    shown = []
    for r in table.rows:
        steps = [best_step(m) for m in r.sources]
        if any(s is not None for s in steps):
            label = r.label.replace(r"$^\ddagger$", "")
            shown.append(f"{label} {'/'.join('?' if s is None else str(s) for s in steps)}")
    if shown:
        table.notes.append("Selected checkpoint (training step, by validation): " + "; ".join(shown) + ".")


def ablation_table(name: str, metrics: list[dict], spec: dict, reported: dict | None = None,
                   dataset: str | None = None) -> Table:
    """One row per configured value of ablation `name` (runs from spec['ablations'][name])."""
    if name not in spec.get("ablations", {}):
        raise ValueError(f"ablation {name!r} is not configured (have: {', '.join(spec.get('ablations', {})) or 'none'})")
    value_of = {run: value for value, run in spec["ablations"][name].items()}
    by_value: dict[str, list[dict]] = {}
    for m in metrics:
        run = base_run(m["run"])
        if run not in value_of:
            raise ValueError(f"{m['path']}: run {run!r} is not a point of ablation {name} "
                             f"(runs: {', '.join(value_of)})")
        by_value.setdefault(value_of[run], []).append(m)
    default = default_value(name, spec)
    rows = []
    for value in ablation_values(name, spec):
        if value in by_value:
            label = latex_escape(reward_label(value) if name == "reward" else value)
            rows.append((value, label + (r"$^\dagger$" if value == default else ""), by_value[value]))
    table = make_table(f"ablation_{name}", "", ABLATION_SYMBOLS.get(name, latex_escape(name)), rows,
                       ABLATION_COLUMNS, reported)
    shown_default = latex_escape(reward_label(default) if name == "reward" else default)
    table.caption = (f"DiCO ablation of {ABLATION_SYMBOLS.get(name, latex_escape(name))}. "
                     f"{_scope_caption(dataset, metrics)} {_scale_caption(table)}")
    table.notes.insert(0, rf"$^\dagger$Default of DiCO ({shown_default}).")
    return table


def ood_spec(config: dict) -> dict:
    """What table ood needs of a validated config: row order and each evaluation set's title."""
    return {"scst_rewards": config["scst"]["rewards"],
            "datasets": {name: {"label": d["label"] or name, "format": d["format"],
                                **({"variant": d["demo"]["variant"]} if d["format"] == "demo" else {})}
                         for name, d in config["evaluate"]["datasets"].items()}}


def ood_table(metrics: dict[str, list[dict]], spec: dict, reported: dict | None = None) -> Table:
    """Runs as rows (the main table's order), one column group of OOD_COLUMNS per evaluation set.

    `metrics`: {set name: its metrics dicts}; each must score that set (its split is the set's name).
    A run without metrics on a set shows "--" there, with the reason."""
    if not metrics:
        raise ValueError("no evaluation-set metrics: evaluate.datasets is empty in the config, so table ood "
                         "has nothing to show; add a set (workflow/schemas/config.schema.yaml, evaluate.datasets)")
    sets_cfg = spec.get("datasets") or {}
    names = [n for n in sets_cfg if n in metrics] + [n for n in metrics if n not in sets_cfg]
    for name in names:
        for m in metrics[name]:
            if m.get("split") != name:
                raise ValueError(f"{m['path']}: scores split {m.get('split')!r}, not evaluation set {name!r}: "
                                 "pass --metrics NAME=PATH with the set the file belongs to")
    by_set = {name: group_by_run(metrics[name]) for name in names}
    runs = run_order([r for name in names for r in by_set[name]], spec.get("scst_rewards", []))
    columns = [(f"{name}:{label}", key) for name in names for label, key in OOD_COLUMNS]
    section = (reported or {}).get("ood", {})
    rows = []
    for run in runs:
        paper = section.get(run, {})
        unknown = set(paper) - {c for c, _ in columns}
        if unknown:
            raise ValueError(f"reported numbers, table ood row {run!r}: unknown columns {sorted(unknown)} "
                             f"(columns: {', '.join(c for c, _ in columns)})")
        cells, sources = {}, []
        for name in names:
            ms = by_set[name].get(run, [])
            sources += ms
            for label, key in OOD_COLUMNS:
                col = f"{name}:{label}"
                cells[col] = (summarise(ms, key, paper.get(col)) if ms else
                              Cell([], "the run has no metrics on this set", paper.get(col),
                                   note_label="every column of the set"))
        label = run_label(run) + (r"$^\ddagger$" if all(best_step(m) == 0 for m in sources) else "")
        rows.append(Row(run, label, cells, sources))
    titles = [sets_cfg.get(n, {}).get("label", n) for n in names]
    # keys: the metric names, so that a metric missing for one reason in every group (SPICE without
    # its jars) gets one note
    table = Table("ood", "", "Method", [c for c, _ in columns], rows, dict(columns),
                  groups=[(latex_escape(t), len(OOD_COLUMNS)) for t in titles],
                  headers={c: c.split(":", 1)[1] for c, _ in columns})
    _note_kept_start(table)
    table.caption = _ood_caption(names, titles, sets_cfg, metrics, table)
    return table


def _ood_caption(names, titles, sets_cfg, metrics, table) -> str:
    parts = []
    for name, title in zip(names, titles):
        n = metrics[name][0].get("n_images") if metrics[name] else None
        parts.append(latex_escape(title) + (f" ({n} images)" if n else ""))
    text = ("Beyond the training data: the models of the main table captioning other data sets, one column "
            f"group each: {', '.join(parts)}.")
    demo = [latex_escape(t) for n, t in zip(names, titles) if sets_cfg.get(n, {}).get("format") == "demo"]
    if demo:
        text += (f" {', '.join(demo)}: generated demo shapes in a palette unseen in training, not a real data set; "
                 "numbers are not comparable to the paper's.")
    return f"{text} {_scale_caption(table)}"


# -- figures -------------------------------------------------------------------------------------
# Readable in print: nothing below 8 pt; TrueType fonts in the PDF so text stays text.
STYLE = {"font.size": 9, "axes.titlesize": 9, "axes.labelsize": 9, "xtick.labelsize": 8,
         "ytick.labelsize": 8, "legend.fontsize": 8, "pdf.fonttype": 42, "axes.spines.top": False,
         "axes.spines.right": False}
VAL_METRICS = ["CIDEr", "CLIP-S", "PAC-S", "RefPAC-S"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, out_pdf, command: str, inputs: list[dict], **extra) -> dict:
    """PDF + PNG (same stem) + provenance, each written atomically."""
    plt = _pyplot()
    out_pdf = Path(out_pdf)
    with atomic_path(out_pdf) as tmp:
        # No creation date: the same inputs give the same bytes.
        fig.savefig(tmp, format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
    with atomic_path(out_pdf.with_suffix(".png")) as tmp:
        fig.savefig(tmp, format="png", dpi=200, bbox_inches="tight")
    plt.close(fig)
    prov = {"output": str(out_pdf), "png": str(out_pdf.with_suffix(".png")), "command": command,
            "dico_git_commit": git_commit(), "inputs": inputs, **extra}
    write_json(provenance_path(out_pdf), prov)
    return prov


def read_train_log(path) -> tuple[list[dict], list[dict]]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return [r for r in rows if r.get("phase") == "train"], [r for r in rows if r.get("phase") == "val"]


def _smooth(values: list[float], window: int = 5) -> list[float]:
    """Trailing moving average (the first points average what exists so far: no start-up lag)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def _plot_training(ax, train: list[dict], run: str) -> None:
    """XE: the loss. Fine-tuning: the mean reward of the k beams (what the method optimises), with the
    loss on a second axis."""
    steps = [r["step"] for r in train]
    label = run_label(run, latex=False)
    if train and "reward_mean" in train[0]:
        reward = [r["reward_mean"] for r in train]
        ax.plot(steps, reward, color="0.7", lw=0.8)
        ax.plot(steps, _smooth(reward), color="tab:orange", lw=1.4, label="reward (mean of k beams)")
        ax.set(title=f"{label}: training", xlabel="step", ylabel="reward")
        twin = ax.twinx()
        twin.plot(steps, [r["loss"] for r in train], color="0.3", lw=0.8, ls="--", label="loss")
        twin.set_ylabel("loss", color="0.3")
        twin.spines["right"].set_visible(True)
    else:
        loss = [r["loss"] for r in train]
        ax.plot(steps, loss, color="0.7", lw=0.8)
        ax.plot(steps, _smooth(loss), color="black", lw=1.4, label="loss")
        ax.set(title=f"{label}: training", xlabel="step", ylabel="loss")


def figure_training_curves(logs: dict[str, str], out_pdf, spec: dict | None = None) -> dict:
    """One row per run: training loss / reward | validation metrics (x100) vs step, the selected step
    dotted, and on demo data the % of fluent captions (`fluent_pct`, right axis)."""
    plt = _pyplot()
    runs = run_order(logs, (spec or {}).get("scst_rewards", []))
    colours = dict(zip(VAL_METRICS, ["tab:blue", "tab:green", "tab:red", "tab:purple"]))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(runs), 2, figsize=(7.0, 1.8 * len(runs) + 0.8), squeeze=False)
        twins = []
        for (ax_train, ax_val), run in zip(axes, runs):
            train, val = read_train_log(logs[run])
            _plot_training(ax_train, train, run)
            for metric in VAL_METRICS:
                pts = [(r["step"], 100 * r[metric]) for r in val if r.get(metric) is not None]
                if pts:
                    ax_val.plot(*zip(*pts), marker="o", ms=3, color=colours[metric], label=metric)
            best = [r["step"] for r in val if r.get("best")]
            if best:
                ax_val.axvline(best[-1], color="0.4", ls=":", lw=1, label="selected")
            fluent = [(r["step"], r["fluent_pct"]) for r in val if r.get("fluent_pct") is not None]
            if fluent:  # demo only: % of captions its grammar can produce, on its own axis (0-100)
                ax_f = ax_val.twinx()
                ax_f.plot(*zip(*fluent), ls="--", marker=".", ms=3, color="0.2", label="fluent %")
                ax_f.set(ylim=(0, 100), ylabel="fluent %")
                twins.append(ax_f)
            ax_val.set(title=f"{run_label(run, latex=False)}: validation", xlabel="step", ylabel=r"score $\times$100")
            for ax in (ax_train, ax_val):
                if not ax.lines:
                    ax.text(0.5, 0.5, "no rows logged", ha="center", va="center", transform=ax.transAxes)
        handles = {}
        for ax in [*axes.flat, *twins]:  # one legend for the whole figure, above it: no line hidden behind text
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=4, frameon=False,
                   bbox_to_anchor=(0.5, 1.0))
        fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig.get_figheight()))
    return save_figure(fig, out_pdf, "dico report figure-training-curves",
                       [{**source_record(p), "run": r} for r, p in logs.items()])


def _family(run: str) -> str:
    run = base_run(run)
    if run.startswith("scst_"):
        return "SCST"
    if run.startswith("dico_"):
        return "DiCO ablation"
    return {"xe": "XE", "dico": "DiCO"}.get(run, "other")


FAMILY_STYLE = {"XE": ("o", "0.35"), "SCST": ("s", "tab:blue"), "DiCO": ("*", "tab:red"),
                "DiCO ablation": ("^", "tab:orange"), "other": ("D", "tab:gray")}


def _mean_metric(metrics: list[dict], key: str):
    return summarise(metrics, key).mean


def _place_labels(ax, points: list[tuple[float, float, str]]) -> None:
    """Label scatter points without overlaps: try a few positions around each point and keep the first
    whose box hits no other label, no marker (its own included) and stays inside the axes (greedy, in
    display coordinates; a label that fits nowhere takes the position with the fewest collisions)."""
    from matplotlib.transforms import Bbox

    renderer = ax.figure.canvas.get_renderer()
    r = 5 * ax.figure.dpi / 72  # half a marker, in pixels
    markers = [Bbox.from_extents(mx - r, my - r, mx + r, my + r)
               for mx, my in ax.transData.transform([(x, y) for x, y, _ in points])]
    # (dx, dy) in points: right/left of the marker, above/below, then straight above/below/beside
    offsets = [(6, 2), (6, -2), (-6, 2), (-6, -2), (0, 7), (0, -7), (8, 0), (-8, 0)]
    placed = []
    for x, y, text in points:
        best = None
        for dx, dy in offsets:
            ha = "left" if dx > 0 else "right" if dx < 0 else "center"
            va = "bottom" if dy > 0 else "top" if dy < 0 else "center"
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points", fontsize=8,
                                ha=ha, va=va)
            box = label.get_window_extent(renderer)
            cost = (sum(box.overlaps(other) for other in placed) + sum(box.overlaps(m) for m in markers)
                    + 2 * (not ax.bbox.contains(box.x0, box.y0) or not ax.bbox.contains(box.x1, box.y1)))
            if best is None or cost < best[0]:
                if best is not None:
                    best[1].remove()
                best = (cost, label, box)
            else:
                label.remove()
            if cost == 0:
                break
        placed.append(best[2])


def figure_tradeoff(metrics: list[dict], out_pdf, spec: dict | None = None) -> dict:
    """PAC-S vs CIDEr and CLIP-S vs CIDEr on test: one labelled point per run (seeds averaged).
    Runs with identical scores (e.g. a fine-tuning run whose best checkpoint is its XE start) share
    one point and one label."""
    plt = _pyplot()
    groups = group_by_run(metrics)
    runs = run_order(groups, (spec or {}).get("scst_rewards", []))
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(7.0, 3.4))
        shared = {}
        for ax, ykey in zip(axes, ["PAC-S", "CLIP-S"]):
            seen, points = set(), {}
            for run in runs:
                x, y = _mean_metric(groups[run], "CIDEr"), _mean_metric(groups[run], ykey)
                if x is None or y is None:
                    continue
                fam = _family(run)
                marker, colour = FAMILY_STYLE[fam]
                ax.scatter([x], [y], marker=marker, color=colour, s=60 if fam == "DiCO" else 30,
                           label=None if fam in seen else fam, zorder=3)
                seen.add(fam)
                points.setdefault((round(x, 6), round(y, 6)), []).append(run_label(run, latex=False))
            ax.margins(0.12)
            ax.set(xlabel=r"CIDEr $\times$100", ylabel=rf"{ykey} $\times$100", title=f"{ykey} vs CIDEr (test)")
            ax.grid(alpha=0.3)
            if seen:
                fig.canvas.draw()
                # runs sharing a point get one short label, "XE (+2)", spelled out under the figure
                _place_labels(ax, [(x, y, names[0] + (f" (+{len(names) - 1})" if len(names) > 1 else ""))
                                   for (x, y), names in points.items()])
                shared.update({names[0]: names[1:] for names in points.values() if len(names) > 1})
            else:
                ax.text(0.5, 0.5, "no runs with both metrics", ha="center", va="center", transform=ax.transAxes)
        handles = {}
        for ax in axes:  # one legend above both panels: none inside the axes to hide points or labels
            for h, lab in zip(*ax.get_legend_handles_labels()):
                handles.setdefault(lab, h)
        if handles:
            fig.legend(handles.values(), handles.keys(), loc="upper center", ncol=len(handles), frameon=False,
                       bbox_to_anchor=(0.5, 1.0))
        bottom = 0.0
        if shared:
            note = "; ".join(f"{first} (+{len(rest)}): also {', '.join(rest)}, same scores"
                             for first, rest in shared.items())
            fig.text(0.5, 0.01, note, ha="center", va="bottom", fontsize=8, wrap=True)
            bottom = 0.3 / fig.get_figheight()
        fig.tight_layout(rect=(0, bottom, 1, 1 - 0.35 / fig.get_figheight()))
    return save_figure(fig, out_pdf, "dico report figure-tradeoff", [source_record(m["path"], m) for m in metrics])


def figure_ablations(metrics: list[dict], out_pdf, spec: dict) -> dict:
    """One column per ablation, rows CIDEr and PAC-S (test) vs the ablated value, default ringed."""
    plt = _pyplot()
    groups = group_by_run(metrics)
    names = [n for n in spec.get("ablations", {}) if any(r in groups for r in spec["ablations"][n].values())]
    with plt.rc_context(STYLE):
        if not names:
            fig, ax = plt.subplots(figsize=(3.5, 1.5))
            ax.axis("off")
            ax.text(0.5, 0.5, "no ablation results", ha="center", va="center")
            return save_figure(fig, out_pdf, "dico report figure-ablations", [])
        fig, axes = plt.subplots(2, len(names), figsize=(max(3.5, 2.3 * len(names)), 4.2), squeeze=False)
        for j, name in enumerate(names):
            values = [v for v in ablation_values(name, spec) if spec["ablations"][name][v] in groups]
            default = default_value(name, spec)
            ticks = [reward_label(v) if name == "reward" else v for v in values]
            for i, key in enumerate(["CIDEr", "PAC-S"]):
                ax = axes[i][j]
                ys = [_mean_metric(groups[spec["ablations"][name][v]], key) for v in values]
                xs = [x for x, y in enumerate(ys) if y is not None]
                ax.plot(xs, [ys[x] for x in xs], marker="o", color="tab:blue" if i == 0 else "tab:red")
                if default in values and ys[values.index(default)] is not None:
                    ax.scatter([values.index(default)], [ys[values.index(default)]], s=140, facecolors="none",
                               edgecolors="black", linewidths=1.2, label="default", zorder=3)
                # Categorical positions: the grids are log-spaced (tau 1..300) or not numbers (reward).
                ax.set_xticks(range(len(values)), ticks)
                ax.set_xlim(-0.5, len(values) - 0.5)
                ax.set(xlabel=ABLATION_SYMBOLS.get(name, name), ylabel=rf"{key} $\times$100")
                ax.grid(alpha=0.3)
            axes[0][j].set_title(f"ablation of {ABLATION_SYMBOLS.get(name, name)}")
        axes[0][0].legend(loc="best", frameon=False)
        fig.tight_layout()
    return save_figure(fig, out_pdf, "dico report figure-ablations", [source_record(m["path"], m) for m in metrics])


def pick_images(image_ids: list[int], n: int) -> list[int]:
    """n ids spread evenly over the split (deterministic, not cherry-picked)."""
    n = min(n, len(image_ids))
    return [image_ids[i * len(image_ids) // n] for i in range(n)]


def figure_qualitative(captions: dict[str, str], splits_path, out_pdf, n_images: int = 6,
                       spec: dict | None = None, width: int = 84) -> dict:
    """N test images, each with one reference (GT) and the caption of every run, wrapped."""
    import numpy as np
    from PIL import Image

    from .data import load_split

    plt = _pyplot()
    runs = run_order(captions, (spec or {}).get("scst_rewards", []))
    by_run = {r: {int(c["image_id"]): c["caption"] for c in read_json(captions[r])} for r in runs}
    records = {rec.image_id: rec for rec in load_split(splits_path, "test")}
    common = [i for i in records if all(i in by_run[r] for r in runs)]
    if not common:
        raise ValueError(f"no test image has a caption from every run ({', '.join(runs)})")
    chosen = pick_images(common, n_images)
    texts = []
    for i in chosen:
        lines = [f"GT: {records[i].captions[0]}"] + [f"{run_label(r, latex=False)}: {by_run[r][i]}" for r in runs]
        texts.append("\n".join(textwrap.fill(t, width, subsequent_indent="   ") for t in lines))
    # One image per row, the captions beside it: a full text width, so ~84 characters per line at 8 pt.
    row_h = max(1.3, 0.15 * max(t.count("\n") + 1 for t in texts) + 0.25)
    with plt.rc_context(STYLE):
        fig, axes = plt.subplots(len(chosen), 2, figsize=(7.0, row_h * len(chosen)), squeeze=False,
                                 gridspec_kw={"width_ratios": [1, 4]})
        for ax in axes.flat:
            ax.axis("off")
        for (ax_img, ax_txt), i, text in zip(axes, chosen, texts):
            ax_img.imshow(np.asarray(Image.open(records[i].path).convert("RGB")))
            ax_img.set_title(f"image {i}", fontsize=8)
            ax_txt.text(0, 1, text, va="top", ha="left", fontsize=8, transform=ax_txt.transAxes)
        fig.tight_layout()
    inputs = [{**source_record(p), "run": r} for r, p in captions.items()] + [source_record(splits_path)]
    inputs += [source_record(records[i].path) for i in chosen]
    return save_figure(fig, out_pdf, "dico report figure-qualitative", inputs, image_ids=chosen)


# -- CLI: `dico report <target>` -----------------------------------------------------------------
def _report_spec(args) -> dict:
    if args.spec_json:
        return json.loads(args.spec_json)
    from . import config as C

    return C.report_spec(C.load(args.config))


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
    spec = _report_spec(args)
    table = main_table(load_metrics(args.metrics), spec, load_reported(args.reported), dataset_name(args.splits))
    write_table(table, args.out, "dico report table-main", args.reported, [args.splits] if args.splits else [])
    log.info("main table: %d rows -> %s", len(table.rows), args.out)


def cmd_table_ablation(args):
    spec = _report_spec(args)
    table = ablation_table(args.ablation, load_metrics(args.metrics), spec, load_reported(args.reported),
                           dataset_name(args.splits))
    write_table(table, args.out, f"dico report table-ablation --ablation {args.ablation}", args.reported,
                [args.splits] if args.splits else [])
    log.info("ablation %s table: %d rows -> %s", args.ablation, len(table.rows), args.out)


def cmd_table_ood(args):
    if args.spec_json:
        spec = json.loads(args.spec_json)
    else:
        from . import config as C

        spec = ood_spec(C.load(args.config))
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
    figure_training_curves(_by_run(args.logs, "train log"), args.out, _report_spec(args))
    log.info("training curves -> %s", args.out)


def cmd_figure_tradeoff(args):
    figure_tradeoff(load_metrics(args.metrics), args.out, _report_spec(args))
    log.info("trade-off figure -> %s", args.out)


def cmd_figure_ablations(args):
    figure_ablations(load_metrics(args.metrics), args.out, _report_spec(args))
    log.info("ablations figure -> %s", args.out)


def cmd_figure_qualitative(args):
    spec = _report_spec(args)
    n = args.n_images or spec.get("report", {}).get("qualitative_images", 6)
    figure_qualitative(_by_run(args.captions, "captions"), args.splits, args.out, n, spec)
    log.info("qualitative figure (%d images) -> %s", n, args.out)


def _target(sub, name: str, help: str, fn, out_help: str):
    p = sub.add_parser(name, help=help, description=help)
    p.add_argument("--config", default="config/config.yaml", help="config YAML (ignored with --spec-json)")
    p.add_argument("--spec-json", help="dico.config.report_spec (or a slice of it), as the Snakefile passes it")
    p.add_argument("--out", required=True, help=out_help)
    p.set_defaults(fn=fn)
    return p


def register(subparsers) -> argparse.ArgumentParser:
    """Add `report` with one sub-command per table and figure to the `dico` parser."""
    parser = subparsers.add_parser("report", help="LaTeX tables and figures from metrics, logs and captions")
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

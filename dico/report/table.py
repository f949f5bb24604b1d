"""The table model and its outputs: cells summarised over seeds, booktabs LaTeX (best per column in bold,
a missing value as "--" with a footnote giving its reason), the CSV twin and the provenance record."""
from __future__ import annotations

import hashlib
import math
import re
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from ..io import Outputs, git_commit
from .inputs import best_step
from .labels import latex_escape


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
    note_kept_start(table)
    return table


def note_kept_start(table: Table) -> None:
    if any(r.label.endswith(r"$^\ddagger$") for r in table.rows):
        # e.g. SCST on a CLIP reward selected by validation CIDEr: every later checkpoint scored lower,
        # so the row repeats its starting model. Say so instead of letting it pass for a result.
        table.notes.append(r"$^\ddagger$No validation improvement during fine-tuning: the selected checkpoint "
                           r"is the starting model (step 0); the training log shows the later steps.")


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
    """.tex (with a provenance comment header), .csv twin and .provenance.json: all three or none."""
    out_tex = Path(out_tex)
    inputs = [source_record(m["path"], m) for r in table.rows for m in r.sources]
    inputs += [source_record(p) for p in [*extra_inputs, reported_path] if p]
    header = [f"{out_tex.name}: written by `{command}` (dico {git_commit() or 'unknown commit'}); "
              "do not edit, rebuild it.", "inputs (path, run, seed, git commit of its evaluation):"]
    header += [f"  {portable(i['path'])}  run={i.get('run', '-')} seed={i.get('seed', '-')} "
               f"commit={i.get('git_commit', '-')}" for i in inputs]
    prov = {"output": str(out_tex), "csv": str(out_tex.with_suffix(".csv")), "table": table.name,
            "command": command, "dico_git_commit": git_commit(), "reported": reported_path and str(reported_path),
            "inputs": inputs}
    with Outputs() as out:
        out.write_text(out_tex, to_latex(table, header))
        out.write_text(out_tex.with_suffix(".csv"), to_frame(table).to_csv(index=False))
        out.write_json(provenance_path(out_tex), prov)
    return prov

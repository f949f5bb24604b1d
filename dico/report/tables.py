"""The paper's tables: the main table (XE, SCST per reward, DiCO), one per ablation, and the
out-of-domain table (one column group per extra evaluation set)."""
from __future__ import annotations

from .inputs import base_run, best_step, group_by_run
from .labels import ABLATION_SYMBOLS, ablation_values, default_value, latex_escape, reward_label, run_label, run_order
from .table import Cell, Row, Table, make_table, note_kept_start, summarise

# (column label as printed, key in the metrics JSON)
MAIN_COLUMNS = [("B-4", "BLEU-4"), ("M", "METEOR"), ("R", "ROUGE-L"), ("C", "CIDEr"), ("S", "SPICE"),
                ("CLIP-S", "CLIP-S"), ("RefCLIP-S", "RefCLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]
ABLATION_COLUMNS = [("B-4", "BLEU-4"), ("M", "METEOR"), ("C", "CIDEr"), ("CLIP-S", "CLIP-S"),
                    ("RefCLIP-S", "RefCLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]
OOD_COLUMNS = [("C", "CIDEr"), ("S", "SPICE"), ("CLIP-S", "CLIP-S"), ("PAC-S", "PAC-S"), ("RefPAC-S", "RefPAC-S")]


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
    note_kept_start(table)
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

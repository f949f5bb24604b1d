"""The paper's figures (matplotlib; PDF + PNG + provenance): training curves, the PAC-S / CLIP-S vs
CIDEr trade-off, the ablations and a qualitative panel."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

from ..io import Outputs, git_commit, read_json
from .inputs import base_run, group_by_run
from .labels import ABLATION_SYMBOLS, ablation_values, default_value, reward_label, run_label, run_order
from .table import provenance_path, source_record, summarise

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
    """PDF + PNG (same stem) + provenance, all three or none (dico.io.Outputs)."""
    plt = _pyplot()
    out_pdf = Path(out_pdf)
    prov = {"output": str(out_pdf), "png": str(out_pdf.with_suffix(".png")), "command": command,
            "dico_git_commit": git_commit(), "inputs": inputs, **extra}
    try:
        with Outputs() as out:
            # No creation date: the same inputs give the same bytes.
            fig.savefig(out.path(out_pdf), format="pdf", bbox_inches="tight", metadata={"CreationDate": None})
            fig.savefig(out.path(out_pdf.with_suffix(".png")), format="png", dpi=200, bbox_inches="tight")
            out.write_json(provenance_path(out_pdf), prov)
    finally:
        plt.close(fig)
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

    from ..data import load_split

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

"""The paper's tables and figures, from the metrics files, training logs and captions.

    inputs    metrics files, the paper's reported numbers (config/paper_reported.yaml), the data set's name
    labels    how runs and ablation values are named (LaTeX / mathtext)
    table     the table model; booktabs LaTeX, the CSV twin, provenance; no machine paths in a table
    tables    the main table, one table per ablation, the out-of-domain table
    figures   training curves, the trade-off, the ablations, a qualitative panel (PDF + PNG + provenance)

Tables print scores x100 with one decimal, the best per column in bold, a missing metric as "--"
with a note giving the reason; a row is a list of metrics files (one per seed: mean ± std); where
the reported numbers have the paper's value, the cell adds reproduced - reported. `dico report
<target>` (dico.cli.report) runs one table or figure with explicit input files, so that a Snakemake
rule depends on exactly the files its target reads.
"""

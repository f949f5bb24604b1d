# DiCO reproduction pipeline: raw data -> features -> XE -> SCST / DiCO (+ ablations) -> captions
# -> metrics -> LaTeX tables, figures and an HTML report.
#   snakemake --cores all                    the embedded demo (config/config.yaml)
#   snakemake --cores all --profile slurm    the paper on a SLURM GPU cluster (config/paper.yaml)
#   snakemake --list-target-rules            one named target per table, figure and ablation
import os

from snakemake.utils import min_version

min_version("9.0")

# The per-step conda envs (envs/*.yaml, `--sdm conda`) install this checkout with `-e ${DICO_CHECKOUT}[...]`:
# conda runs pip beside Snakemake's copy of the env file under the conda prefix, where a relative path
# would point elsewhere, and pip expands ${VAR} in what it installs.
os.environ.update(DICO_CHECKOUT=workflow.basedir)  # set here, not read: no `envvars:` needed


# The demo config is the default; a config given with --configfile (the slurm profile gives
# config/paper.yaml) replaces it rather than being merged over it, so no demo setting leaks.
if not workflow.config_settings.configfiles:

    configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/download.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/features.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/official.smk"
include: "workflow/rules/report.smk"


rule all:
    default_target: True
    input:
        all_metrics(),
        all_ood_metrics(),
        TABLES,
        FIGURES,

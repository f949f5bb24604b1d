# Stages 4-6: XE pre-training, then fine-tuning from the best XE checkpoint: SCST with each
# configured reward, DiCO, and one DiCO run per ablation point; with `seeds`, xe, the scst runs and
# dico once more per extra seed N (<run>_seedN, fine-tuned from xe_seedN). Resumable state lives in
# results/runs/<run>/work/ (not a declared output, so --rerun-incomplete keeps it); the TensorBoard curves
# in results/runs/<run>/tensorboard/ (not an output either: the run rewrites them from its log when it starts).
# `exec`: the shell becomes the training process, so SIGTERM (SLURM preemption / time limit) reaches
# it alone and Snakemake waits for its checkpoint, instead of seeing the shell die at once and SLURM
# then tearing the job step down half-way through the checkpoint.


rule train_xe:
    input:
        splits=L.splits_file(),
        features_train=L.features_index(BACKBONE, "train"),
        features_val=L.features_index(BACKBONE, "val"),
        nltk=NLTK_INPUTS,  # validation post-processes its captions as generate does
    output:
        model=L.run_model("{run}"),
        log=L.train_log("{run}"),
    wildcard_constraints:
        run=r"xe(_seed\d+)?",
    params:
        spec=lambda wc: spec(dc.run_spec(config, wc.run)),
        **launch.training_params(config, GPU_SLOTS),
    resources:
        **launch.resources(config, "train_xe"),
    # 1 thread: the demo's XE ran 1.2x faster on 2 threads than on 1 (bench/RESULTS.md), and on a small
    # machine the other core trains the second CLIP stand-in meanwhile; the slurm profile sets its own.
    threads: 1
    # the demo's critical path (CLIP -> features -> XE -> fine-tuning): before the embeddings jobs
    priority: 10
    log:
        L.log("train", "{run}"),
    conda:
        "../../envs/train.yaml"
    shell:
        "exec {params.gpu}{params.launch} train {wildcards.run} --spec-json {params.spec:q} --splits {input.splits}"
        " --features-train {input.features_train} --features-val {input.features_val}"
        " --out-model {output.model} --out-log {output.log} --threads {params.threads} > {log} 2>&1"


rule train_scst:
    input:
        unpack(finetune_inputs),
    output:
        model=L.run_model("{run}"),
        log=L.train_log("{run}"),
    wildcard_constraints:
        run="scst_[a-z0-9_]+",
    params:
        spec=lambda wc: spec(dc.run_spec(config, wc.run)),
        models=finetune_args,
        **launch.training_params(config, GPU_SLOTS),
    resources:
        **launch.resources(config, "train_scst"),
    threads: 1
    log:
        L.log("train", "{run}"),
    conda:
        "../../envs/train.yaml"
    shell:
        "exec {params.gpu}{params.launch} train {wildcards.run} --spec-json {params.spec:q} --splits {input.splits}"
        " --init {input.init} --features-train {input.features_train} --features-val {input.features_val}"
        " {params.models} --out-model {output.model} --out-log {output.log} --threads {params.threads} > {log} 2>&1"


use rule train_scst as train_dico with:
    resources:
        **launch.resources(config, "train_dico"),
    wildcard_constraints:
        run=r"dico(_[a-z]+-[^/]+)?(_seed\d+)?",
    # the longer runs first (DiCO also runs the frozen reference): on a small machine the run left to
    # train alone at the end is a shorter SCST run
    priority: 1

# Stage 3: frozen CLIP-architecture models. Demo models are trained here; the backbone's grid
# features and every scorer's image embeddings are cached once per split: COCO's train/val/test, and
# results/.../ood/<name> for each extra evaluation set (evaluate.datasets), from that set's split file.


rule train_clip:
    input:
        unpack(train_clip_inputs),
    output:
        model="results/clip_models/{name}.pt",
        stats="results/clip_models/{name}.json",
    params:
        spec=lambda wc: spec(dc.clip_model_spec(config, wc.name)),
        init=lambda wc, input: f"--init {input.init}" if "init" in input.keys() else "",
    # clip_models.<name>.train.threads (the demo's clip: 2, the only job that can run at that point)
    threads: lambda wc: dc.clip_model_spec(config, wc.name)["train"]["threads"]
    # after XE's features (6), beside XE (10): the demo's pac (from clip) must be done when XE is
    priority: 5
    log:
        "results/logs/train_clip/{name}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico train-clip --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " {params.init} --out {output.model} --stats {output.stats} --threads {threads} > {log} 2>&1"


# features.jobs is how many jobs share a split; it is not in the spec: it does not change the shards.
FEATURES_SPEC = spec({k: v for k, v in dc.features_spec(config).items() if k != "jobs"})

if FEATURE_JOBS == 1:
    # One job per split. The extra evaluation sets have twins of these rules (reading their own split
    # files), so that COCO's rules stay as they were and existing results are not redone.

    rule cache_features:
        input:
            splits=splits_file(),
            checkpoint=clip_model_path(BACKBONE),
        output:
            f"results/features/{BACKBONE}/{{split}}/index.json",
        params:
            spec=FEATURES_SPEC,
        threads: 1
        # XE (10) waits for train and val; test and the embeddings jobs (0) feed nothing yet
        priority: lambda wc: 6 if wc.split in ("train", "val") else 3
        log:
            "results/logs/cache_features/{split}.log",
        conda:
            "../../envs/features.yaml"
        shell:
            "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {wildcards.split}"
            " --checkpoint {input.checkpoint} --out-dir $(dirname {output}) --threads {threads} > {log} 2>&1"

    rule cache_features_ood:
        input:
            splits=lambda wc: ood_splits_file(wc.dataset),
            checkpoint=clip_model_path(BACKBONE),
        output:
            features_index("ood/{dataset}"),
        params:
            spec=FEATURES_SPEC,
        threads: 1
        log:
            "results/logs/cache_features/ood/{dataset}.log",
        conda:
            "../../envs/features.yaml"
        shell:
            "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {wildcards.dataset}"
            " --checkpoint {input.checkpoint} --out-dir $(dirname {output}) --threads {threads} > {log} 2>&1"

else:
    # features.jobs: N > 1. Part k of N (still named cache_features, so a profile's GPU resources apply)
    # caches its own contiguous shard range and writes part-k-of-N.json; gather_features checks every
    # shard and writes the index, which is what the readers depend on. {split}: COCO's train/val/test
    # or ood/<name> (split_source).

    rule cache_features:
        input:
            unpack(split_inputs),
        output:
            f"results/features/{BACKBONE}/{{split}}/part-{{part}}-of-{FEATURE_JOBS}.json",
        wildcard_constraints:
            split=ANY_SPLIT,
            part=r"\d+",
        params:
            spec=FEATURES_SPEC,
            split=lambda wc: split_source(wc.split)[1],
            parts=FEATURE_JOBS,
        threads: 1
        log:
            f"results/logs/cache_features/{{split}}.part-{{part}}-of-{FEATURE_JOBS}.log",
        conda:
            "../../envs/features.yaml"
        shell:
            "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {params.split}"
            " --checkpoint {input.checkpoint} --part {wildcards.part} --parts {params.parts}"
            " --out-dir $(dirname {output}) --threads {threads} > {log} 2>&1"

    rule gather_features:
        input:
            unpack(split_inputs),
            parts=lambda wc: feature_parts(wc.split),
        output:
            features_index("{split}"),
        wildcard_constraints:
            split=ANY_SPLIT,
        params:
            spec=FEATURES_SPEC,
            split=lambda wc: split_source(wc.split)[1],
            parts=FEATURE_JOBS,
        localrule: True  # reads the shards' headers only
        log:
            "results/logs/cache_features/{split}.gather.log",
        conda:
            "../../envs/features.yaml"
        shell:
            "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {params.split}"
            " --checkpoint {input.checkpoint} --gather {params.parts} --out-dir $(dirname {output}) > {log} 2>&1"


# One job per model for every split the DAG reads embeddings of (EMBEDDING_SPLITS): one model load.
rule cache_embeddings:
    input:
        splits=splits_file(),
        checkpoint=lambda wc: clip_model_path(wc.name),
    output:
        [embeddings_file("{name}", s) for s in EMBEDDING_SPLITS],
    params:
        # features.skip_broken_images reaches the spec only when on: the default leaves params unchanged
        spec=lambda wc: spec(
            {**dc.clip_model_spec(config, wc.name), "skip_broken_images": True}
            if config["features"]["skip_broken_images"]
            else dc.clip_model_spec(config, wc.name)
        ),
        split=" ".join(EMBEDDING_SPLITS),
    threads: 1
    log:
        "results/logs/cache_embeddings/{name}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico cache-embeddings --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " --split {params.split} --checkpoint {input.checkpoint} --out {output}"
        " --threads {threads} > {log} 2>&1"


# The twin for the extra evaluation sets (their own split files; one split named after the set).
rule cache_embeddings_ood:
    input:
        splits=lambda wc: ood_splits_file(wc.dataset),
        checkpoint=lambda wc: clip_model_path(wc.name),
    output:
        embeddings_file("{name}", "ood/{dataset}"),
    params:
        spec=lambda wc: spec(
            {**dc.clip_model_spec(config, wc.name), "skip_broken_images": True}
            if config["features"]["skip_broken_images"]
            else dc.clip_model_spec(config, wc.name)
        ),
    threads: 1
    log:
        "results/logs/cache_embeddings/ood/{name}_{dataset}.log",
    conda:
        "../../envs/features.yaml"
    shell:
        "dico cache-embeddings --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " --split {wildcards.dataset} --checkpoint {input.checkpoint} --out {output}"
        " --threads {threads} > {log} 2>&1"

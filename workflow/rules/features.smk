# Stage 3: frozen CLIP-architecture models. Demo models are trained here; the backbone's grid
# features and every scorer's image embeddings are cached once per {split}: COCO's train / val / test
# and ood/<set> for each extra evaluation set, from that split's own split file.


rule train_clip:
    input:
        unpack(train_clip_inputs),
    output:
        model=L.clip_model("{name}"),
        stats=L.clip_stats("{name}"),
    params:
        spec=lambda wc: spec(dc.clip_model_spec(config, wc.name)),
        init=lambda wc, input: f"--init {input.init}" if "init" in input.keys() else "",
        **launch.gpu_params(GPU_SLOTS),
    resources:
        **launch.resources(config, "train_clip"),
    # clip_models.<name>.train.threads (the demo's clip: 2, the only job that can run at that point)
    threads: lambda wc: dc.clip_model_spec(config, wc.name)["train"]["threads"]
    # after XE's features (6), beside XE (10): the demo's pac (from clip) must be done when XE is
    priority: 5
    log:
        L.log("train_clip", "{name}"),
    conda:
        "../../envs/features.yaml"
    shell:
        "{params.gpu}dico train-clip --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " {params.init} --out {output.model} --stats {output.stats} --threads {threads} > {log} 2>&1"


# features.jobs is how many jobs share a split; it is not in the spec: it does not change the shards.
FEATURES_SPEC = spec({k: v for k, v in dc.features_spec(config).items() if k != "jobs"})
# features.jobs = 1: one job per split writes the index. N > 1: part k of N (still cache_features, so a
# profile's GPU resources apply) caches its own contiguous shard range and writes part-k-of-N.json;
# gather_features checks every shard and writes the index, which is what the readers depend on.
PARTS = f" --parts {FEATURE_JOBS}" if FEATURE_JOBS > 1 else ""


rule cache_features:
    input:
        unpack(split_inputs),
    output:
        L.feature_part(BACKBONE, "{split}", "{part}", FEATURE_JOBS) if PARTS else L.features_index(BACKBONE, "{split}"),
    params:
        spec=FEATURES_SPEC,
        split=split_name,
        part=lambda wc: f" --part {wc.part}{PARTS}" if PARTS else "",
        **launch.gpu_params(GPU_SLOTS),
    resources:
        **launch.resources(config, "cache_features"),
    threads: 1
    # XE (10) waits for train and val; the rest (0-3) feeds nothing yet
    priority: lambda wc: 6 if wc.split in ("train", "val") else 3
    log:
        L.log("cache_features", f"{{split}}.part-{{part}}-of-{FEATURE_JOBS}" if PARTS else "{split}"),
    conda:
        "../../envs/features.yaml"
    shell:
        "{params.gpu}dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {params.split}"
        " --checkpoint {input.checkpoint}{params.part} --out-dir $(dirname {output}) --threads {threads} > {log} 2>&1"


if PARTS:

    rule gather_features:
        input:
            unpack(split_inputs),
            parts=lambda wc: [L.feature_part(BACKBONE, wc.split, k, FEATURE_JOBS) for k in range(FEATURE_JOBS)],
        output:
            L.features_index(BACKBONE, "{split}"),
        params:
            spec=FEATURES_SPEC,
            split=split_name,
            parts=FEATURE_JOBS,
        localrule: True  # reads the shards' headers only
        log:
            L.log("cache_features", "{split}.gather"),
        conda:
            "../../envs/features.yaml"
        shell:
            "dico cache-features --spec-json {params.spec:q} --splits {input.splits} --split {params.split}"
            " --checkpoint {input.checkpoint} --gather {params.parts} --out-dir $(dirname {output}) > {log} 2>&1"


# One job per model and split (features.skip_broken_images reaches the spec only when on: the default
# leaves params unchanged).
EMBEDDINGS_SPEC = lambda wc: spec(
    {**dc.clip_model_spec(config, wc.name), "skip_broken_images": True}
    if config["features"]["skip_broken_images"]
    else dc.clip_model_spec(config, wc.name)
)


rule cache_embeddings:
    input:
        unpack(split_inputs),
    output:
        L.embeddings_file("{name}", "{split}"),
    params:
        spec=EMBEDDINGS_SPEC,
        split=split_name,
        **launch.gpu_params(GPU_SLOTS),
    resources:
        **launch.resources(config, "cache_embeddings"),
    threads: 1
    log:
        L.log("cache_embeddings", "{name}", "{split}"),
    conda:
        "../../envs/features.yaml"
    shell:
        "{params.gpu}dico cache-embeddings --spec-json {params.spec:q} --name {wildcards.name} --splits {input.splits}"
        " --split {params.split} --checkpoint {input.checkpoint} --out {output}"
        " --threads {threads} > {log} 2>&1"


# evaluate.group_runs (the demo): each model's embeddings of COCO's splits in one job (torch and open_clip
# start once, the work is a second); the per-split rule above serves the extra sets.
if config["evaluate"]["group_runs"]:

    ruleorder: cache_embeddings_splits > cache_embeddings

    use rule cache_embeddings as cache_embeddings_splits with:
        input:
            splits=L.splits_file(),
            checkpoint=lambda wc: clip_model_path(wc.name),
        output:
            [L.embeddings_file("{name}", s) for s in EMBEDDING_SPLITS],
        params:
            spec=EMBEDDINGS_SPEC,
            split=" ".join(EMBEDDING_SPLITS),
        log:
            L.log("cache_embeddings", "{name}"),

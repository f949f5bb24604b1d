# Stage 1-2: the data. The demo generates images and captions in the Karpathy schema; COCO comes
# as dataset_coco.json + images; your own data set as a folder of images + a captions file. All end
# in one normalised split file; each extra evaluation set (evaluate.datasets) gets one of its own.


rule make_demo_data:
    output:
        L.demo_karpathy(),
    params:
        spec=spec(dc.demo_spec(config)),
    log:
        L.log("make_demo_data"),
    conda:
        "../../envs/data.yaml"
    shell:
        "dico make-demo-data --spec-json {params.spec:q} --out-dir $(dirname {output}) > {log} 2>&1"


if config["data"]["source"] == "folder":

    # Your own data set: a folder of images and a captions file, split by a hash of each image's name
    # (dico.own_data). The folder is ancient(): its mtime moves with any file inside it; the captions
    # file, which every added image needs a line in, is what reruns the split.
    rule prepare_splits:
        input:
            captions=config["data"]["folder"]["captions"],
            images=ancient(config["data"]["folder"]["images"]),
        output:
            L.splits_file(),
        params:
            spec=spec(dc.folder_spec(config)),
        log:
            L.log("prepare_splits"),
        conda:
            "../../envs/data.yaml"
        shell:
            "dico prepare-splits --spec-json {params.spec:q} --out {output} > {log} 2>&1"

else:

    rule prepare_splits:
        input:
            karpathy=dc.karpathy_file(config),
            images=coco_image_dirs(),
        output:
            L.splits_file(),
        params:
            image_root=lambda wildcards: dc.image_root(config),
            max_refs=(
                f"--max-refs {config['data']['max_refs']}" if config["data"]["max_refs"] else ""
            ),
        log:
            L.log("prepare_splits"),
        conda:
            "../../envs/data.yaml"
        shell:
            "dico prepare-splits --karpathy-json {input.karpathy} --image-root {params.image_root}"
            " {params.max_refs} --out {output} > {log} 2>&1"


# An extra evaluation set's split file, from its annotations (downloaded by download_ood_<name> when
# missing) or, for a demo set, generated here. A localrule: nocaps images are fetched by URL (compute
# nodes may be offline), and the rest is light.
rule prepare_ood:
    input:
        unpack(ood_inputs),
    output:
        L.eval_set_splits("{dataset}"),
    params:
        spec=lambda wc: spec(dc.eval_set_spec(config, wc.dataset)),
        train_from=L.splits_file(),
        # untracked, as the downloads' (dico.download.Untracked): retry settings rerun nothing
        fetch=Untracked(
            f"--retries {config['data']['downloads']['retries']}"
            f" --timeout {config['data']['downloads']['timeout_s']}"
        ),
    localrule: True
    log:
        L.log("prepare_ood", "{dataset}"),
    conda:
        "../../envs/data.yaml"
    shell:
        "dico prepare-splits --eval-set {wildcards.dataset} --spec-json {params.spec:q}"
        " --train-from {params.train_from} {params.fetch} --out {output} > {log} 2>&1"

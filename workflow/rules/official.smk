# The released DiCO checkpoint (aimagelab/DiCO, config `official`), scored like our runs: downloaded
# (when official.url is set), mapped onto our captioner by `dico convert-official`, then captioned and
# scored as run dico_official by the generate and evaluate rules (target evaluate_official).
import shlex


if config["official"]["url"]:

    rule download_official:
        output:
            config["official"]["path"],
        params:
            source=download_args(
                {"url": config["official"]["url"], "sha256": config["official"]["sha256"], "options": {}}
            ),
        localrule: True
        retries: 2
        log:
            L.log("download", "official"),
        conda:
            "../../envs/data.yaml"
        shell:
            "dico download file {params.source} --out {output} > {log} 2>&1"


rule convert_official:
    input:
        src=config["official"]["path"],
    output:
        L.run_model(OFFICIAL_RUN),
    params:
        backbone=BACKBONE,
        # a pickle that holds more than tensors is read only when pinned or trusted (untracked: pinning
        # a file that converted fine changes nothing)
        trust=Untracked(
            " ".join(
                ([f"--sha256 {shlex.quote(config['official']['sha256'])}"] if config["official"]["sha256"] else [])
                + (["--trust-pickle"] if config["official"]["trust_pickle"] else [])
            )
        ),
    log:
        L.log("convert_official"),
    conda:
        "../../envs/train.yaml"
    shell:
        "dico convert-official --src {input.src} --out {output} --backbone {params.backbone} {params.trust} > {log} 2>&1"


rule evaluate_official:
    input:
        [L.metrics_file(OFFICIAL_RUN, s) for s in EVAL_SPLITS],
    localrule: True

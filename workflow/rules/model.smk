# The backbone, the VLA folder that replaces its config.json, and the MLP weights for MoE init.


rule download:
    output:
        directory(result("backbone")),
    log:
        f"{LOGS}/download.log",
    conda:
        ENV
    container:
        config["container"]
    params:
        source=config["model"]["backbone"],
    shell:
        "exec vlaflow download {params.source:q} {output:q} > {log:q} 2>&1"


rule vla_config:
    input:
        rules.download.output,
    output:
        directory(result("vla")),
    log:
        f"{LOGS}/vla_config.log",
    conda:
        ENV
    container:
        config["container"]
    params:
        head=lambda w: cli_options(
            **{
                key: config["model"][key]
                for key in (
                    "action_dim",
                    "state_dim",
                    "chunk_size",
                    "policy_head_size",
                    "llm_loss_weight",
                    "with_llm_head",
                )
            }
        ),
    shell:
        "exec vlaflow make-vla-config {input:q} {output:q} {params.head:q} > {log:q} 2>&1"


rule mlp_weights:
    input:
        rules.download.output,
    output:
        result("mlp_weights.safetensors"),
    log:
        f"{LOGS}/mlp_weights.log",
    conda:
        ENV
    container:
        config["container"]
    shell:
        "exec vlaflow save-mlp-weights {input:q} {output:q} > {log:q} 2>&1"

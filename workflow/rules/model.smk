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
        "vlaflow download {params.source} {output} > {log} 2>&1"


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
        head=lambda w: (
            f"--action-dim {config['model']['action_dim']} --state-dim {config['model']['state_dim']} "
            f"--chunk-size {config['model']['chunk_size']} --policy-head-size {config['model']['policy_head_size']} "
            f"--llm-loss-weight {config['model']['llm_loss_weight']} "
            + (
                "--with-llm-head"
                if config["model"]["with_llm_head"]
                else "--no-with-llm-head"
            )
        ),
    shell:
        "vlaflow make-vla-config {input} {output} {params.head} > {log} 2>&1"


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
        "vlaflow save-mlp-weights {input} {output} > {log} 2>&1"

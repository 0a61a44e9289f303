"""The `vlaflow` command line: one subcommand per workflow step, so the same command runs in a
Snakemake rule, under torchrun, srun or a container."""

import argparse
import sys
from pathlib import Path

from vlaflow.errors import VlaflowError
from vlaflow.models.scale_dp.configuration_scale_dp import SCALE_DP_SIZES


def _download(args) -> None:
    from vlaflow.backbone.download import download

    download(args.source, args.out, seed=args.seed)
    print(f"backbone written to {args.out}")


def _make_vla_config(args) -> None:
    from vlaflow.backbone.vla_config import make_vla_folder

    make_vla_folder(
        args.backbone,
        args.out,
        policy_head=dict(
            size=args.policy_head_size,
            action_dim=args.action_dim,
            state_dim=args.state_dim,
            chunk_size=args.chunk_size,
        ),
        using_moe=args.using_moe,
        with_llm_head=args.with_llm_head,
        llm_loss_weight=args.llm_loss_weight,
    )
    print(f"VLA model folder written to {args.out}")


def _save_mlp_weights(args) -> None:
    from vlaflow.backbone.mlp_weights import save_mlp_weights

    save_mlp_weights(args.backbone, args.out)
    print(f"MLP weights written to {args.out}")


def _check_model(args) -> None:
    from vlaflow.model_check import check_model

    check_model(args.model, args.mlp_weights, batch_size=args.batch_size)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlaflow", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    download = commands.add_parser("download", help="write a backbone folder (builtin tiny model, hub, or local)")
    download.add_argument("source", help="builtin:tiny-qwen2-vl | hf:<org>/<name>@<revision> | a local folder")
    download.add_argument("out", type=Path)
    download.add_argument("--seed", type=int, default=0, help="weights seed of the builtin tiny model")
    download.set_defaults(run=_download)

    vla = commands.add_parser("make-vla-config", help="write a VLA model folder linking the backbone's files")
    vla.add_argument("backbone", type=Path)
    vla.add_argument("out", type=Path)
    # Options left out take the defaults of the model's configuration classes.
    vla.add_argument("--action-dim", type=int)
    vla.add_argument("--state-dim", type=int)
    vla.add_argument("--chunk-size", type=int, help="actions predicted per query")
    vla.add_argument("--policy-head-size", choices=sorted(SCALE_DP_SIZES))
    vla.add_argument("--using-moe", action=argparse.BooleanOptionalAction)
    vla.add_argument("--with-llm-head", action=argparse.BooleanOptionalAction)
    vla.add_argument("--llm-loss-weight", type=float)
    vla.set_defaults(run=_make_vla_config)

    mlp = commands.add_parser("save-mlp-weights", help="save the backbone's decoder MLP weights for MoE init")
    mlp.add_argument("backbone", type=Path)
    mlp.add_argument("out", type=Path, help="a .safetensors file")
    mlp.set_defaults(run=_save_mlp_weights)

    check = commands.add_parser("check-model", help="load a VLA folder and run batched inference once")
    check.add_argument("model", type=Path)
    check.add_argument("--mlp-weights", type=Path, help="initialise both experts from this file first")
    check.add_argument("--batch-size", type=int, default=2)
    check.set_defaults(run=_check_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except VlaflowError as error:
        print(f"vlaflow {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `vlaflow` command line: one subcommand per workflow step, so the same command runs in a
Snakemake rule, under torchrun, srun or a container."""

import argparse
import multiprocessing
import signal
import sys
from pathlib import Path

from vlaflow.config import schema_defaults
from vlaflow.cpus import limit_torch_threads
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
        policy_head={
            "size": args.policy_head_size,
            "action_dim": args.action_dim,
            "state_dim": args.state_dim,
            "chunk_size": args.chunk_size,
        },
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


def _data_check(args) -> None:
    from vlaflow.data.check import check_data

    problems = check_data(args.config, image_sample=args.sample_images, model=args.model, batch_size=args.batch_size)
    if problems:
        raise VlaflowError(f"{len(problems)} problem(s) in the data of {args.config}; see the lines above")
    print(f"data of {args.config}: no problems")


def _data_easy_vqa(args) -> None:
    from vlaflow.data.easy_vqa import build_easy_vqa_benchmark, build_easy_vqa_train

    build_easy_vqa_train(
        args.train_out,
        limit=args.train_images,
        seed=args.seed,
        max_turns=args.max_turns,
        multiple_choice=args.multiple_choice,
        options=args.options,
        image_sizes=args.image_sizes,
        text_only=args.text_only,
    )
    build_easy_vqa_benchmark(args.benchmark_out, limit=args.benchmark_questions, seed=args.seed, options=args.options)
    print(f"easy-vqa training conversations in {args.train_out}, benchmark in {args.benchmark_out}")


def _data_aloha_demos(args) -> None:
    from vlaflow.sim.demos import record_demos

    record_demos(
        args.out,
        args.episodes,
        seed=args.seed,
        height=args.height,
        width=args.width,
        camera=args.camera,
        shadows=args.shadows,
        workers=args.workers,
        compress=args.compress,
        task=args.task,
    )


def _data_convert(args) -> None:
    from vlaflow.data.episode_formats import EPISODE_FORMATS
    from vlaflow.data.lerobot_writer import convert_to_lerobot

    if args.source_format not in EPISODE_FORMATS:
        raise VlaflowError(
            f"--from: unknown robot data format {args.source_format!r} (formats: {', '.join(EPISODE_FORMATS)})"
        )
    episodes = EPISODE_FORMATS[args.source_format].episodes(args.source, {})
    convert_to_lerobot(episodes, args.out, fps=args.fps, robot_type=args.robot_type)
    print(f"{len(episodes)} episodes of {args.source} written as a LeRobot v3.0 dataset to {args.out}")


def _train(args) -> None:
    from vlaflow.training.run import train

    out = train(args.config, args.stage, args.init, args.workdir, args.out, mlp_weights=args.mlp_weights)
    print(f"{args.stage} model written to {out}")


def _eval_vqa(args) -> None:
    from vlaflow.evaluation.vqa import evaluate_vqa

    summary = evaluate_vqa(
        args.model,
        args.benchmarks,
        args.lmudata,
        args.out,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        limit=args.limit,
        kinds=dict(args.kinds),
    )
    for name, result in summary.items():
        print(f"{name}: accuracy {result['overall']:.4f} over {result['total']} questions")


def _eval_robot(args) -> None:
    """The evaluations print their own progress and summaries, with the files they wrote."""
    from vlaflow.evaluation.robot import evaluate_closed_loop, evaluate_open_loop

    if args.open_loop:
        evaluate_open_loop(
            args.model, args.out, split=args.split, datasets=args.datasets, batch_size=args.batch_size, limit=args.limit
        )
    if args.episodes:
        evaluate_closed_loop(
            args.model,
            args.out,
            episodes=args.episodes,
            seed=args.seed,
            max_steps=args.max_steps,
            temporal_ensemble=args.temporal_ensemble,
            query_every=args.query_every,
            video_size=tuple(args.video_size),
            task=args.task,
            server=args.server,
        )


def _serve(args) -> None:
    from vlaflow.serving.server import run_server

    run_server(
        args.model,
        args.host,
        args.port,
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        max_message_mib=args.max_message_mib,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
    )


def _report(args) -> None:
    from vlaflow.report import Run, write_report

    short = [run for run in args.runs if len(run) < 2]
    if short:
        raise VlaflowError(f"--run {' '.join(short[0])}: give a label and a model folder, then evaluation folders")
    runs = [Run(label, Path(model), tuple(map(Path, evaluations))) for label, model, *evaluations in args.runs]
    out = write_report(runs, args.out, title=args.title)
    print(f"report written to {out / 'report.html'} and {out / 'report.md'}")


def positive_int(text: str) -> int:
    """An argparse type: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value}: must be at least 1")
    return value


def benchmark_kind_declaration(text: str) -> tuple[str, str]:
    """An argparse type: NAME=KIND."""
    name, equals, kind = text.partition("=")
    if not (name and equals and kind):
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=KIND, e.g. MyProbe=yes_or_no")
    return name, kind


def _image_size(text: str) -> tuple[int, int]:
    height, _, width = text.partition("x")
    if not (height.isdigit() and width.isdigit() and int(height) > 0 and int(width) > 0):
        raise argparse.ArgumentTypeError(f"{text!r}: expected HEIGHTxWIDTH, e.g. 480x640")
    return int(height), int(width)


def _add_data_commands(commands) -> None:
    data = commands.add_parser("data", help="build the embedded default's data; check a config's datasets")
    data_commands = data.add_subparsers(dest="data_command", required=True)

    check = data_commands.add_parser("check", help="validate every dataset a config uses, before training")
    check.add_argument("--config", type=Path, required=True)
    check.add_argument(
        "--sample-images",
        type=positive_int,
        metavar="N",
        help="decode the images of N episodes / N VL entries per dataset (default: all)",
    )
    check.add_argument("--model", type=Path, help="a model folder whose processor collates the shown batch")
    check.add_argument("--batch-size", type=positive_int, default=4)
    check.set_defaults(run=_data_check)

    easy_vqa = data_commands.add_parser(
        "easy-vqa", help="easy-vqa as LLaVA training JSON and a VLMEvalKit TSV benchmark"
    )
    easy_vqa.add_argument("train_out", type=Path, help="folder for the images and the LLaVA JSON")
    easy_vqa.add_argument("benchmark_out", type=Path, help="the benchmark TSV, by convention LMUData/EasyVQA.tsv")
    easy_vqa.add_argument("--train-images", type=positive_int, help="images of the train split to use (default: all)")
    easy_vqa.add_argument("--max-turns", type=positive_int, default=8, help="questions per training conversation")
    easy_vqa.add_argument(
        "--multiple-choice",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of training questions asked in the benchmark's multiple-choice format, answered by letter",
    )
    easy_vqa.add_argument(
        "--image-sizes",
        type=_image_size,
        nargs="+",
        metavar="HxW",
        help="write the training images as JPEGs at these sizes, in turn (default: the package's 64x64 PNGs)",
    )
    easy_vqa.add_argument(
        "--text-only",
        type=float,
        default=0.0,
        metavar="FRACTION",
        help="share of training conversations without an image (questions about the answer words)",
    )
    easy_vqa.add_argument(
        "--benchmark-questions", type=positive_int, help="questions of the test split to use (default: all)"
    )
    easy_vqa.add_argument("--options", type=int, default=4, help="options per multiple-choice question")
    easy_vqa.add_argument("--seed", type=int, default=0)
    easy_vqa.set_defaults(run=_data_easy_vqa)

    demos = data_commands.add_parser("aloha-demos", help="scripted demonstrations of a task in the ALOHA simulator")
    demos.add_argument("out", type=Path, help="folder for the HDF5 episodes")
    demos.add_argument("--episodes", type=positive_int, required=True, help="successful episodes to write")
    demos.add_argument("--height", type=positive_int, default=240)
    demos.add_argument("--width", type=positive_int, default=320)
    demos.add_argument("--camera", default="top")
    demos.add_argument(
        "--shadows",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="render shadows (more than half of a frame's cost in software rendering)",
    )
    demos.add_argument(
        "--workers", type=positive_int, help="parallel simulator processes (at most, and by default, one per CPU)"
    )
    demos.add_argument("--compress", action="store_true", help="store frames as JPEG")
    demos.add_argument("--seed", type=int, default=0, help="first seed; episode i uses the i-th seed tried")
    demos.add_argument("--task", help="the simulator task (vlaflow.sim.tasks; default: transfer_cube)")
    demos.set_defaults(run=_data_aloha_demos)

    convert = data_commands.add_parser(
        "convert", help="a folder of robot episodes as a LeRobot v3.0 dataset (LeRobot's tools read it)"
    )
    convert.add_argument("source", type=Path, help="the dataset folder to read")
    convert.add_argument("out", type=Path, help="the new dataset's folder (must not exist)")
    convert.add_argument("--from", dest="source_format", default="hdf5", help="the source's format (default: hdf5)")
    convert.add_argument(
        "--fps", type=positive_int, default=50, help="frames per second of the recording (default: 50, ALOHA's)"
    )
    convert.add_argument("--robot-type", help="LeRobot's robot_type, e.g. aloha")
    convert.set_defaults(run=_data_convert)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlaflow", description=__doc__)
    # DeepSpeed's launcher, unless given --no_local_rank (as the workflow gives it), passes this
    # before the subcommand; every process takes its rank from LOCAL_RANK instead.
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)
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
    vla.add_argument("--action-dim", type=positive_int)
    vla.add_argument("--state-dim", type=positive_int)
    vla.add_argument("--chunk-size", type=positive_int, help="actions predicted per query")
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
    check.add_argument("--batch-size", type=positive_int, default=2)
    check.set_defaults(run=_check_model)

    _add_data_commands(commands)

    train = commands.add_parser("train", help="train one stage of the config's stage table; resumes by itself")
    train.add_argument("--config", type=Path, required=True)
    train.add_argument("--stage", required=True, help="a key of the config's stages")
    train.add_argument("--init", type=Path, required=True, help="the model folder to start from")
    train.add_argument(
        "--mlp-weights", type=Path, help="start the MLPs from this file (stages with mlp_init, stage 1 among them)"
    )
    train.add_argument("--workdir", type=Path, required=True, help="resumable checkpoints and logs")
    train.add_argument("--out", type=Path, required=True, help="the trained model, written when training ends")
    train.set_defaults(run=_train)

    evaluate = commands.add_parser("eval", help="evaluate a trained model: VQA benchmarks, robot control")
    evaluations = evaluate.add_subparsers(dest="eval_command", required=True)
    vqa = evaluations.add_parser("vqa", help="VLMEvalKit benchmark TSVs, answered by the VL expert")
    vqa.add_argument("--model", type=Path, required=True)
    vqa.add_argument("--benchmarks", nargs="+", required=True, metavar="NAME", help="read from LMUDATA/<NAME>.tsv")
    vqa.add_argument("--lmudata", type=Path, required=True, help="VLMEvalKit's LMUData folder")
    vqa.add_argument("--out", type=Path, required=True, help="a new folder for predictions and accuracies")
    vqa_defaults = schema_defaults("evaluation", "vqa")
    vqa.add_argument("--batch-size", type=positive_int, default=vqa_defaults["batch_size"])
    vqa.add_argument("--max-new-tokens", type=positive_int, default=vqa_defaults["max_new_tokens"])
    vqa.add_argument("--limit", type=positive_int, help="only the first N questions of each benchmark")
    vqa.add_argument(
        "--kinds",
        nargs="+",
        type=benchmark_kind_declaration,
        default=[],
        metavar="NAME=KIND",
        help="a benchmark's kind where its name does not imply it (multiple_choice, yes_or_no)",
    )
    vqa.set_defaults(run=_eval_vqa)

    robot = evaluations.add_parser("robot", help="action-chunk error on held-out episodes; ALOHA closed loop")
    robot.add_argument("--model", type=Path, required=True)
    robot.add_argument(
        "--out",
        type=Path,
        required=True,
        help="folder for open_loop.json and, per simulator task, closed_loop_<task>.json and rollout_<task>.gif",
    )
    robot.add_argument("--open-loop", action=argparse.BooleanOptionalAction, default=True)
    robot_defaults = schema_defaults("evaluation", "robot")
    robot.add_argument("--split", default=robot_defaults["split"], help="the registry split of held-out episodes")
    robot.add_argument("--datasets", nargs="+", help="registry names (default: the model's training robot data)")
    robot.add_argument("--batch-size", type=positive_int, default=8)
    robot.add_argument("--limit", type=positive_int, help="at most N held-out steps, spread over the split")
    robot.add_argument(
        "--episodes",
        type=int,
        default=robot_defaults["episodes"],
        help="closed-loop episodes in the simulator (0: none)",
    )
    robot.add_argument("--seed", type=int, default=robot_defaults["seed"], help="seed of the first closed-loop episode")
    robot.add_argument("--max-steps", type=positive_int, default=robot_defaults["max_steps"])
    robot.add_argument("--temporal-ensemble", action="store_true", help="average the chunks that cover a step (ACT)")
    robot.add_argument(
        "--query-every",
        type=positive_int,
        metavar="STEPS",
        help="steps between policy queries (default: 1 with --temporal-ensemble, else the chunk size)",
    )
    robot.add_argument(
        "--video-size",
        type=positive_int,
        nargs=2,
        default=tuple(robot_defaults["video_size"]),
        metavar=("HEIGHT", "WIDTH"),
        help="size of the first rollout's video, rollout_<task>.gif",
    )
    robot.add_argument("--task", help="one simulator task (default: each one the training demonstrations show)")
    robot.add_argument(
        "--server", metavar="URL", help="act through `vlaflow serve` at ws://HOST:PORT instead of in process"
    )
    robot.set_defaults(run=_eval_robot)

    serve = commands.add_parser("serve", help="a websocket policy server for robots and chat (openpi's messages)")
    serve.add_argument("--model", type=Path, required=True, help="a model folder trained on robot data")
    serve.add_argument("--host", default="127.0.0.1", help="the address to listen on (0.0.0.0: every interface)")
    serve.add_argument("--port", type=int, default=8000, help="the port (0: any free one, printed)")
    serve.add_argument("--max-batch", type=positive_int, default=8, help="action requests answered together")
    serve.add_argument(
        "--batch-wait-ms", type=float, default=5.0, help="how long a request waits for others to join its batch"
    )
    serve.add_argument("--max-message-mib", type=float, default=32.0, help="larger messages close their connection")
    serve.add_argument("--max-new-tokens", type=positive_int, default=64, help="the longest chat answer")
    serve.add_argument("--seed", type=int, default=0, help="the action noise's seed until a client resets it")
    serve.set_defaults(run=_serve)

    report = commands.add_parser("report", help="one page on a run: losses, evaluations, the forgetting table")
    report.add_argument("--out", type=Path, required=True, help="a new folder for report.html, report.md and figures")
    report.add_argument(
        "--run",
        dest="runs",
        nargs="+",
        action="append",
        required=True,
        metavar="LABEL MODEL_DIR EVAL_DIR",
        help="a label, a trained model and the folders of its evaluations; repeat in the recipe's order",
    )
    report.add_argument("--title", default="vlaflow run")
    report.set_defaults(run=_report)
    return parser


def _stop_child_processes() -> None:
    """End the data-loading workers of a command that failed. They ignore SIGTERM (the trainer
    saves before it stops), so the SIGTERM that Python's exit sends its child processes would
    leave the exit waiting on them forever; SIGKILL ends them. PyTorch's SIGCHLD handler would
    take their end for a crash of its own, so it goes first."""
    children = multiprocessing.active_children()
    if not children:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in children:
        child.kill()
    for child in children:
        child.join(timeout=10)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    limit_torch_threads()
    try:
        args.run(args)
    except VlaflowError as error:
        _stop_child_processes()
        subcommand = getattr(args, "data_command", None) or getattr(args, "eval_command", None)
        command = " ".join(filter(None, (args.command, subcommand)))
        print(f"vlaflow {command}: error: {error}", file=sys.stderr)
        return 2
    except BaseException:
        _stop_child_processes()
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())

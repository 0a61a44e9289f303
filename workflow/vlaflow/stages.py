"""The stage table: every training arm of a run is one row of the config's `stages`.

A row says what the stage starts from (the VLA folder built from the backbone, or another stage's
model), whether its decoder MLPs are the static MoE or one dense MLP, whether they start from the
start model's MLP weights (its dense MLP or its vision-language expert), which modules stay
frozen, which data kinds it reads, and which evaluations follow. The workflow, the trainer, the
evaluations and the report all read the same rows; the schema holds their defaults.
"""

from dataclasses import dataclass, replace

from vlaflow.errors import ConfigError

BACKBONE = "backbone"
VQA, ROBOT_CONTROL = "vqa", "robot"
EXPERTS = ("vl_expert", "robot_expert")
# Names the workflow already uses for its targets; a stage's name becomes a target too.
RESERVED_NAMES = frozenset(
    {
        BACKBONE,
        "all",
        "download",
        "vla_config",
        "mlp_weights",
        "stage_mlp_weights",
        "easy_vqa",
        "aloha_demos",
        "data_check",
        "train",
        "eval_vqa",
        "eval_robot",
        "report",
        "stage2_ckpt",
    }
)


@dataclass(frozen=True)
class Stage:
    name: str
    start: str  # BACKBONE or the name of the stage whose model this one starts from
    moe: bool
    mlp_init: bool
    freeze: tuple[str, ...]
    robot: tuple[str, ...]
    vl: tuple[str, ...]
    evaluations: tuple[str, ...]

    @property
    def starts_from_backbone(self) -> bool:
        return self.start == BACKBONE


def _row(name: str, settings: dict) -> Stage:
    return Stage(
        name=name,
        start=settings["from"],
        moe=settings["moe"],
        mlp_init=settings["mlp_init"],
        freeze=tuple(settings["freeze"]),
        robot=tuple(settings["robot"]),
        vl=tuple(settings["vl"]),
        evaluations=tuple(settings.get("evaluate", ())),
    )


def stage_table(config: dict, source: str = "config") -> dict[str, Stage]:
    """The config's stages in their listed order, each checked against the others: a start that
    names no stage, a cycle, or a combination training cannot do is a ConfigError naming the key."""
    rows = {name: _row(name, settings) for name, settings in config["stages"].items()}
    for name, row in rows.items():
        where = f"{source}: stages.{name}"
        if name in RESERVED_NAMES:
            raise ConfigError(f"{where}: the name is taken by the workflow (reserved: {', '.join(sorted(RESERVED_NAMES))})")
        _check_start(rows, row, where)
    table = {}
    for name, row in rows.items():
        where = f"{source}: stages.{name}"
        start_moe = True if row.starts_from_backbone else rows[row.start].moe
        if row.starts_from_backbone and not row.mlp_init:
            raise ConfigError(
                f"{where}.mlp_init: a stage that starts from the backbone starts its MLPs (both experts, or the "
                "dense MLP) from the backbone's saved MLP weights: set mlp_init: true"
            )
        if not row.starts_from_backbone and start_moe != row.moe and not row.mlp_init:
            layout = "the MoE" if row.moe else "a dense MLP"
            raise ConfigError(
                f"{where}.mlp_init: {row.start}'s model has {'the MoE' if start_moe else 'a dense MLP'} and this "
                f"stage {layout}: set mlp_init: true to start its MLPs from {row.start}'s MLP weights"
            )
        experts = sorted(set(row.freeze) & set(EXPERTS))
        if experts and not row.moe:
            raise ConfigError(f"{where}.freeze: {experts[0]} needs the MoE (moe: true); a dense model has no experts")
        if row.robot and "policy_head" in row.freeze:
            raise ConfigError(f"{where}.freeze: the stage trains on robot data, so policy_head cannot be frozen")
        evaluations = row.evaluations or _default_evaluations(rows, row)
        if ROBOT_CONTROL in evaluations and not _robot_trained(rows, row):
            raise ConfigError(
                f"{where}.evaluate: robot: neither this stage nor one it starts from trains on robot data"
            )
        table[name] = replace(row, evaluations=evaluations)
    return table


def _check_start(rows: dict[str, Stage], row: Stage, where: str) -> None:
    if row.starts_from_backbone:
        return
    if row.start not in rows:
        raise ConfigError(
            f"{where}.from: {row.start!r} is neither {BACKBONE!r} nor a stage of this config "
            f"(stages: {', '.join(rows)})"
        )
    chain, current = [row.name], row
    while not current.starts_from_backbone:
        current = rows[current.start]
        if current.name in chain:
            raise ConfigError(f"{where}.from: the stages start from each other in a cycle: {' -> '.join(chain + [current.name])}")
        chain.append(current.name)


def _robot_trained(rows: dict[str, Stage], row: Stage) -> bool:
    return any(stage.robot for stage in lineage(rows, row.name))


def _default_evaluations(rows: dict[str, Stage], row: Stage) -> tuple[str, ...]:
    """VQA after every stage; robot control after every stage whose model acts on robot data."""
    return (VQA, ROBOT_CONTROL) if _robot_trained(rows, row) else (VQA,)


def lineage(rows: dict[str, Stage], name: str) -> list[Stage]:
    """The stage `name` and the stages it starts from, nearest first, up to the backbone."""
    chain = [rows[name]]
    while not chain[-1].starts_from_backbone:
        chain.append(rows[chain[-1].start])
    return chain

"""The deployment files (envs/*.yaml with their post-deploy scripts, docker/Dockerfile) agree with
the project's single list of exact versions, envs/cpu-constraints.txt, and with pyproject.toml.

The conda environment files copy the pins instead of referencing the constraints file, since
Snakemake builds them from a copy in .snakemake/conda/ and hashes their text only (see the top of
envs/vlaflow.yaml); these tests are what keeps the copies honest. The Dockerfile installs under
the constraints file itself. Nothing here builds or reaches the network: the files are parsed."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parent.parent
CONSTRAINTS = ROOT / "envs" / "cpu-constraints.txt"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CPU_INDEX = "https://download.pytorch.org/whl/cpu"

# What each environment must cover: the extras of pyproject.toml it installs, and the constraints
# it may leave out, each with the reason. A constraint added to cpu-constraints.txt fails these
# tests until each environment pins it or says here why not.
# The parity tests' VLMEvalKit (extra `vlmevalkit`, and ms-vlmeval itself without dependencies).
VLMEVALKIT = ("ms-vlmeval", "sty", "validators", "tabulate", "tqdm")
ENVS = {
    "vlaflow": {
        "extras": ["sim", "workflow"],
        "not_pinned": {
            "pytest": "tests run from .venv (make test), not in the rules' environment",
            "snakefmt": "a format check for developers",
            "deepspeed": "GPU training; the CPU environment runs the embedded default without it",
            **{package: "VLMEvalKit for the parity tests, in .venv only" for package in VLMEVALKIT},
        },
    },
    "vlaflow-gpu": {
        "extras": ["sim", "workflow", "deepspeed", "gpu"],
        "not_pinned": {
            "pytest": "tests run from .venv (make test), not in the rules' environment",
            "snakefmt": "a format check for developers",
            **{package: "VLMEvalKit for the parity tests, in .venv only" for package in VLMEVALKIT},
        },
    },
}
# Installed by an environment's post-deploy script instead of its pip list (compiled against the
# torch the list installs).
POST_DEPLOY_ONLY = {"vlaflow-gpu": {"flash-attn"}}
DOCKER_EXTRAS = {"sim", "deepspeed", "workflow"}


def _constraints() -> dict[str, str]:
    pins = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            (specifier,) = requirement.specifier
            assert specifier.operator == "==", f"{line}: the constraints hold exact versions only"
            pins[canonicalize_name(requirement.name)] = specifier.version
    return pins


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirements(extras) -> list[Requirement]:
    project = _pyproject()["project"]
    optional = project.get("optional-dependencies", {})
    missing = [extra for extra in extras if extra not in optional]
    assert not missing, f"pyproject.toml has no extra {missing}, which the deployment files install"
    lines = list(project["dependencies"])
    for extra in extras:
        lines += optional[extra]
    return [Requirement(line) for line in lines]


def _env(name) -> dict:
    return yaml.safe_load((ROOT / "envs" / f"{name}.yaml").read_text())


def _pip_list(env) -> list[str]:
    (pip,) = [entry["pip"] for entry in env["dependencies"] if isinstance(entry, dict)]
    return pip


def _pins(lines) -> dict[str, Requirement]:
    """Requirement lines of a pip list, by normalised name (options such as an index are skipped)."""
    requirements = [Requirement(line) for line in lines if not line.lstrip().startswith("-")]
    return {canonicalize_name(requirement.name): requirement for requirement in requirements}


def _exact(requirement: Requirement) -> str:
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{requirement} is not an exact pin"
    return specifiers[0].version


def _post_deploy(name) -> Path:
    return ROOT / "envs" / f"{name}.post-deploy.sh"


def _shell_pins(text: str, variables: dict[str, str]) -> dict[str, str]:
    """`name==version` in shell text, with ${VAR} and $VAR taken from `variables`."""
    expanded = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: variables.get(m[1] or m[2], m[0]), text)
    return {canonicalize_name(m[1]): m[2] for m in re.finditer(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\"';]+)", expanded)}


def _script_variables(text: str) -> dict[str, str]:
    return dict(re.findall(r"^([A-Z_][A-Z0-9_]*)=(\S+)$", text, flags=re.MULTILINE))


# ---------------------------------------------------------------------------------- Dockerfile


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comment lines dropped."""
    instructions, current = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.rstrip().endswith("\\"):
            current += line.rstrip()[:-1] + " "
            continue
        current += line
        if current.strip():
            keyword, _, arguments = current.strip().partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
        current = ""
    return instructions


def _docker(keyword) -> list[str]:
    return [arguments for instruction, arguments in _instructions() if instruction == keyword]


def _runs() -> list[str]:
    """The shell commands of the RUN instructions, without RUN's own flags (--mount=...)."""
    return [re.sub(r"^(--\S+\s+)+", "", arguments) for arguments in _docker("RUN")]


def _docker_args() -> dict[str, str]:
    variables = {}
    for arguments in _docker("ARG"):
        name, _, default = shlex.split(arguments)[0].partition("=")
        variables[name] = default
    return variables


def _docker_env() -> dict[str, str]:
    variables = {}
    for arguments in _docker("ENV"):
        for pair in shlex.split(arguments):
            name, _, value = pair.partition("=")
            variables[name] = value
    return variables


def _uv_installs() -> list[list[str]]:
    """The words of every `uv pip install` command in the Dockerfile's RUN instructions."""
    commands = []
    for run in _runs():
        for command in re.split(r"&&|;", run):
            words = shlex.split(command)
            # environment assignments may stand before the command
            while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):
                words.pop(0)
            if words[:3] == ["uv", "pip", "install"]:
                commands.append(words[3:])
    return commands


def _install_options(words) -> tuple[dict[str, list[str]], list[str]]:
    """Options (each with its values) and positional requirements of one install command."""
    takes_value = {"--constraint", "-c", "-r", "--requirement", "--extra", "--index-url", "--extra-index-url"}
    options, positional, words = {}, [], list(words)
    while words:
        word = words.pop(0)
        if word.startswith("-"):
            options.setdefault(word, []).append(words.pop(0) if word in takes_value else "")
        else:
            positional.append(word)
    return options, positional


# ---------------------------------------------------------------------------------- tests


def test_constraints_are_exact_pins_without_duplicates():
    lines = [line.split("#", 1)[0].strip() for line in CONSTRAINTS.read_text().splitlines()]
    names = [canonicalize_name(Requirement(line).name) for line in lines if line]
    assert len(names) == len(set(names)), "a package appears twice in envs/cpu-constraints.txt"
    assert "torch" in _constraints()


@pytest.mark.parametrize("name", ENVS)
def test_env_file_is_conda_forge_python_and_pip_only(name):
    env = _env(name)
    assert env["name"] == name
    assert env["channels"] == ["conda-forge", "nodefaults"]
    conda_packages = [entry for entry in env["dependencies"] if isinstance(entry, str)]
    # every Python package through pip, so that one resolver sees them all
    assert sorted(re.split(r"[=<>!]", spec)[0] for spec in conda_packages) == ["pip", "python"]
    # Snakemake creates the environment from a copy in .snakemake/conda/, and conda runs pip from
    # the copy's folder: a file or folder named in the pip list would be looked for there.
    for line in _pip_list(env):
        option = line.split()[0]
        assert option not in {"-e", "--editable", "-r", "--requirement", "-c", "--constraint"}, line
        assert not line.startswith((".", "/", "file:")), line


def test_python_version_is_one_and_allowed_by_pyproject():
    versions = set()
    for name in ENVS:
        (python,) = [spec for spec in _env(name)["dependencies"] if isinstance(spec, str) and spec.startswith("python")]
        match = re.fullmatch(r"python=(\d+\.\d+)", python)
        assert match, f"{name}: pin Python to a minor version, e.g. python=3.11 (not {python!r})"
        versions.add(match[1])
    versions.add(_docker_args()["PYTHON_VERSION"])
    assert len(versions) == 1, f"envs/*.yaml and docker/Dockerfile name different Pythons: {versions}"
    (version,) = versions
    requires_python = SpecifierSet(_pyproject()["project"]["requires-python"])
    assert requires_python.contains(f"{version}.0"), f"Python {version} is outside requires-python {requires_python}"


@pytest.mark.parametrize("name", ENVS)
def test_env_pins_are_the_constraints(name):
    constraints = _constraints()
    pins = _pins(_pip_list(_env(name)))
    versions = {package: _exact(requirement) for package, requirement in pins.items()}
    expected = {package: version for package, version in constraints.items() if package not in ENVS[name]["not_pinned"]}
    differing = {
        p: (versions[p], constraints[p]) for p in versions.keys() & constraints.keys() if versions[p] != constraints[p]
    }
    assert not differing, f"envs/{name}.yaml (here, constraints): {differing}"
    missing = sorted(expected.keys() - versions.keys())
    assert not missing, (
        f"envs/{name}.yaml lacks constraints {missing}: pin them there as "
        + ", ".join(f"{p}=={constraints[p]}" for p in missing)
        + f", or say why not in ENVS['{name}']['not_pinned'] in this file"
    )


@pytest.mark.parametrize("name", ENVS)
def test_env_covers_every_dependency_of_pyproject(name):
    pins = _pins(_pip_list(_env(name)))
    post_deploy = POST_DEPLOY_ONLY.get(name, set())
    for requirement in _requirements(ENVS[name]["extras"]):
        package = canonicalize_name(requirement.name)
        if package in post_deploy:
            continue
        assert package in pins, f"envs/{name}.yaml does not install {requirement} (pyproject.toml)"
        version = _exact(pins[package])
        assert requirement.specifier.contains(version, prereleases=True), (
            f"envs/{name}.yaml pins {package}=={version}, outside pyproject.toml's {requirement}"
        )


def test_cpu_env_takes_torch_cpu_build_and_gpu_env_the_cuda_build():
    cpu, gpu = _pip_list(_env("vlaflow")), _pip_list(_env("vlaflow-gpu"))
    assert f"--extra-index-url {CPU_INDEX}" in cpu, "without the CPU index Linux gets PyPI's CUDA torch"
    assert not any(CPU_INDEX in line for line in gpu)
    for lines in (cpu, gpu):
        assert "torchvision" not in _pins(lines), "vlaflow's CPU path cannot use torchvision; it needs none"


def test_local_version_label_satisfies_the_torch_constraint():
    """The CPU index's 2.13.0+cpu (picked over PyPI's 2.13.0 as the higher version) and a CUDA
    build from a PyTorch index (the Dockerfile's TORCH_INDEX_URL) report a local label; the plain
    `==` pin of the constraints must admit them, and they must sort above the plain version."""
    torch = _constraints()["torch"]
    for label in ("cpu", "cu128", "cu130"):
        assert SpecifierSet(f"=={torch}").contains(f"{torch}+{label}")
        assert Version(f"{torch}+{label}") > Version(torch)


@pytest.mark.parametrize("name", ENVS)
def test_post_deploy_script_installs_vlaflow_editable_without_deps(name):
    script = _post_deploy(name)
    assert script.is_file(), f"Snakemake runs {script.name} after creating envs/{name}.yaml; it installs vlaflow"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "pip install --no-deps --editable" in text
    assert "pip check" in text
    assert 'name = "vlaflow"' in (ROOT / "pyproject.toml").read_text(), "the script finds the source by this line"
    if shutil.which("bash"):
        subprocess.run(["bash", "-n", str(script)], check=True)
    constraints = _constraints()
    for package, version in _shell_pins(text, _script_variables(text)).items():
        if package in constraints:
            assert version == constraints[package], (
                f"{script.name}: {package}=={version}, constraints {constraints[package]}"
            )


def test_flash_attn_is_one_version_allowed_by_pyproject():
    script = _post_deploy("vlaflow-gpu").read_text()
    in_env = _shell_pins(script, _script_variables(script))["flash-attn"]
    in_image = _shell_pins(" ".join(_runs()), _docker_args())["flash-attn"]
    assert in_env == in_image, (
        f"flash-attn: {in_env} in envs/vlaflow-gpu.post-deploy.sh, {in_image} in docker/Dockerfile"
    )
    (requirement,) = [r for r in _requirements(["gpu"]) if canonicalize_name(r.name) == "flash-attn"]
    assert requirement.specifier.contains(in_image, prereleases=True)
    assert "flash-attn" not in _constraints(), "flash-attn cannot be installed on CPU machines"


def test_dockerfile_installs_vlaflow_and_extras_under_the_constraints():
    constraints = _constraints()
    installs = [_install_options(words) for words in _uv_installs()]
    constrained = [(options, positional) for options, positional in installs if "--constraint" in options]
    for options, positional in installs:
        if "--constraint" in options:
            assert options["--constraint"] == ["envs/cpu-constraints.txt"]
        elif "--no-deps" not in options:
            # build tools only; a package of the constraints installed here would escape its pin
            escaped = {canonicalize_name(Requirement(p).name) for p in positional} & constraints.keys()
            assert not escaped, f"docker/Dockerfile installs {escaped} without the constraints"
    # torch alone first, from its own index
    assert any(positional == ["torch"] and "--index-url" in options for options, positional in constrained)
    # the dependencies of pyproject.toml with the extras
    (project,) = [options for options, _ in constrained if options.get("-r") == ["pyproject.toml"]]
    extras = set(project["--extra"])
    assert DOCKER_EXTRAS <= extras
    _requirements(sorted(extras))  # each exists in pyproject.toml
    # vlaflow itself last, its dependencies already there, then checked
    assert any(positional == ["."] and "--no-deps" in options for options, positional in installs)
    assert any(re.search(r"\buv pip check\b", run) for run in _runs())
    # no exact version in the Dockerfile differs from the constraints
    pins = _shell_pins(" ".join(_runs()), _docker_args())
    differing = {p: v for p, v in pins.items() if p in constraints and v != constraints[p]}
    assert not differing, f"docker/Dockerfile pins {differing}, unlike envs/cpu-constraints.txt"
    copied = " ".join(_docker("COPY"))
    assert "envs/cpu-constraints.txt" in copied and "pyproject.toml" in copied


def test_dockerfile_renders_headless_and_runs_the_workflow():
    env = _docker_env()
    assert env["MUJOCO_GL"] == "egl"
    assert env["PYOPENGL_PLATFORM"] == "egl"
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["NVIDIA_DRIVER_CAPABILITIES"] == "all", "`graphics` brings the driver's EGL for MuJoCo"
    apt = " ".join(run for run in _runs() if "apt-get install" in run).split()
    for package in ("libegl1", "libgl1", "libglvnd0", "libgles2", "libegl-mesa0"):
        assert package in apt, f"docker/Dockerfile does not install {package}"
    assert "libEGL_nvidia.so.0" in " ".join(_runs()), "glvnd needs the NVIDIA EGL vendor file"
    assert _docker_args()["CUDA_IMAGE"].startswith("nvidia/cuda:") and "-devel-" in _docker_args()["CUDA_IMAGE"]
    assert _docker("WORKDIR")[-1] == "/workflow"
    copied = " ".join(_docker("COPY"))
    for path in ("Snakefile", "config/", "workflow/", "README.md"):
        assert path in copied, f"docker/Dockerfile does not copy {path}"
    assert not _docker("ENTRYPOINT")
    assert _docker("CMD") == ['["vlaflow", "--help"]']


def test_dockerfile_is_labelled_with_the_package_version():
    assert _docker_args()["VLAFLOW_VERSION"] == _pyproject()["project"]["version"]
    assert 'org.opencontainers.image.version="${VLAFLOW_VERSION}"' in " ".join(_docker("LABEL"))


def test_dockerignore_lets_through_what_the_dockerfile_copies():
    """docker/Dockerfile.dockerignore excludes everything and lets the copied paths back in."""
    patterns = [
        line.strip()
        for line in (ROOT / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*"
    allowed = {pattern[1:].rstrip("/") for pattern in patterns if pattern.startswith("!")}
    for arguments in _docker("COPY"):
        words = shlex.split(arguments)
        if any(word.startswith("--from") for word in words):
            continue
        for source in words[:-1]:
            assert source.rstrip("/") in allowed, f"{source} is copied by docker/Dockerfile but ignored"
            assert (ROOT / source).exists(), f"docker/Dockerfile copies {source}, which does not exist"

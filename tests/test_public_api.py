"""The public surface is pinned, and dependencies point one way (DESIGN.md, "Layout")."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

PACKAGES = ["schemas", "bus", "actors", "orchestrator"]

# Changing these lists is changing the public contract: update README and DESIGN.md too.
EXPECTED = {
    "schemas": [
        "Ack", "AgentSettings", "AgentUsage", "Checkpoint", "CodecError", "CompletionEvent",
        "DeadLetterEvent", "ErrorDetail", "Event", "ExitReason", "FailedGate", "FailedItem",
        "FailureContext", "GateOutcome", "GateResult", "GateResults", "GateSpec", "HiveConfig",
        "HivebusError", "ItemOutcome", "ItemStatus", "IterationRecord", "JSON", "Lease",
        "LeaseEvent", "LeaseRelease", "LeaseRequest", "LifecycleEvent", "LimitExceededEvent",
        "LimitHit", "MESSAGE_TYPES", "MSGPACK", "Message", "Model", "PRIORITY_RANK", "Plan",
        "PlanAttempt", "PlanRequest", "PlannerSpec", "PoolConfig", "ProgressEvent", "Rejected",
        "ReportEvent", "RequestRejected", "ResourceSnapshot", "ResourceSpec", "SCHEMA_VERSION",
        "SnapshotRequest", "Stage", "TAIL_CHARS", "TERMINAL_STATES", "TaskAccepted",
        "TaskFileError", "TaskList", "TaskQuery", "TaskRecord", "TaskRef", "TaskSpec",
        "TaskState", "TransportError", "UsageEvent", "VerifyRequest", "WorkItemAssignment",
        "WorkItemBatch", "WorkItemResult", "WorkItemResults", "WorkItemSpec", "dag_problems", "decode", "encode",
        "encode_json_line", "find_cycle", "load_task_file", "utcnow",
    ],
    "bus": [
        "Bus", "EmbeddedNats", "EmbeddedNatsError", "decode_message", "decode_reply",
        "find_nats_server", "subjects",
    ],
    "actors": [
        "AgentHost", "AgentPool", "AgentStartError", "ChildOutcome", "ChildSpec",
        "DeclarativePlanner", "ExecutorCore", "ExecutorHost", "HOSTS", "LLMError", "LeaseBook",
        "LeaseRefused", "Limits", "NAMESPACE", "OllamaPlanner", "PlannerError", "PlannerHost",
        "PromptRunner", "ResourceHost", "VerifierCore", "VerifierHost", "agent_names",
        "fit_to_cluster", "run_child",
    ],
    "orchestrator": [
        "AsyncHive", "Hive", "InvalidTransition", "Orchestrator", "PlanError", "Scheduler",
        "Verdict", "fingerprint", "judge_iteration", "transition",
    ],
}

# What each package may import from the others: orchestrator -> actors -> bus -> schemas.
MAY_NOT_IMPORT = {
    "schemas": {"bus", "actors", "orchestrator"},
    "bus": {"actors", "orchestrator"},
    "actors": {"orchestrator"},
}


@pytest.mark.parametrize("package", PACKAGES)
def test_a_packages_public_names_are_exactly_the_pinned_list(package):
    module = importlib.import_module(package)
    assert sorted(module.__all__) == EXPECTED[package]
    assert len(module.__all__) == len(set(module.__all__)), "a name is exported twice"


@pytest.mark.parametrize("package", PACKAGES)
def test_every_public_name_can_be_imported(package):
    module = importlib.import_module(package)
    missing = [name for name in module.__all__ if not hasattr(module, name)]
    assert missing == []


def test_every_message_type_is_public():
    import schemas

    assert {cls.__name__ for cls in schemas.MESSAGE_TYPES.values()} <= set(schemas.__all__)


def test_every_public_error_is_a_hivebus_error():
    import actors
    import bus
    import orchestrator
    import schemas

    errors = [getattr(pkg, name) for pkg in (schemas, bus, actors, orchestrator)
              for name in pkg.__all__
              if isinstance(getattr(pkg, name), type) and issubclass(getattr(pkg, name), Exception)]
    assert len(errors) >= 8
    # CodecError is a ValueError on purpose: it becomes a Rejected reply, not a user error.
    strays = [e.__name__ for e in errors
              if not issubclass(e, schemas.HivebusError) and e is not schemas.CodecError]
    assert strays == []


def imported_packages(path: Path, package: str) -> set[str]:
    """The top-level packages a module imports, with relative imports resolved."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.add((node.module or "").split(".")[0])
            elif node.level == 1:
                found.add(package)
            elif node.module:  # from ..other import x: a sibling top-level package
                found.add(node.module.split(".")[0])
            else:  # from .. import other
                found |= {alias.name for alias in node.names}
    return found


def package_files(package: str) -> list[Path]:
    root = Path(importlib.import_module(package).__file__).parent
    return sorted(root.rglob("*.py"))


@pytest.mark.parametrize("package", sorted(MAY_NOT_IMPORT))
def test_dependencies_point_one_way(package):
    files = package_files(package)
    assert files, f"no modules found for {package}"
    offenders = {
        f"{path.name} imports {sorted(bad)}"
        for path in files
        if (bad := imported_packages(path, package) & MAY_NOT_IMPORT[package])
    }
    assert offenders == set()


def test_the_import_checker_sees_absolute_and_relative_imports(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "import orchestrator.service\n"
        "from actors import planner\n"
        "from . import sibling\n"
        "from ..bus import subjects\n"
        "def later():\n"
        "    import json\n",
        encoding="utf-8",
    )
    assert imported_packages(module, "schemas") == {"orchestrator", "actors", "schemas", "bus", "json"}

"""The orchestrator: task state machine, DAG scheduler, plan-execute-verify loop, Hive, CLI."""

from .hive import AsyncHive, Hive
from .machine import InvalidTransition, Verdict, fingerprint, judge_iteration, transition
from .scheduler import PlanError, Scheduler
from .service import Orchestrator

__all__ = [
    # the runtime
    "Hive", "AsyncHive", "Orchestrator",
    # pure decisions
    "Scheduler", "PlanError", "transition", "judge_iteration", "fingerprint", "Verdict",
    "InvalidTransition",
]

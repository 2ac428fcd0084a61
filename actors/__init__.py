"""Ray actors (planner, executor, verifier, resource manager) and their plain-Python cores."""

from .executor import ExecutorCore
from .limits import Limits
from .llm import LLMError, OllamaPlanner, PromptRunner
from .hosts import HOSTS, AgentHost, ExecutorHost, PlannerHost, ResourceHost, VerifierHost
from .planner import DeclarativePlanner, PlannerError
from .pool import NAMESPACE, AgentPool, AgentStartError, agent_names, fit_to_cluster
from .resources import LeaseBook, LeaseRefused
from .sandbox import ChildOutcome, ChildSpec, run_child
from .verifier import VerifierCore

__all__ = [
    # cores
    "DeclarativePlanner", "PlannerError", "ExecutorCore", "VerifierCore", "LeaseBook", "LeaseRefused",
    # LLM
    "OllamaPlanner", "PromptRunner", "LLMError",
    # sandbox and limits
    "run_child", "ChildSpec", "ChildOutcome", "Limits",
    # Ray hosts
    "AgentHost", "PlannerHost", "ExecutorHost", "VerifierHost", "ResourceHost", "HOSTS",
    "AgentPool", "AgentStartError", "agent_names", "fit_to_cluster", "NAMESPACE",
]

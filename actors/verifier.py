"""The verifier's plain-Python core: run a task's quality gates against its workdir."""

from __future__ import annotations

import os
import shlex
import shutil
import tempfile
import time

from schemas.base import utcnow
from schemas.task import GateSpec
from schemas.work import GateResult, GateResults, VerifyRequest

from .sandbox import ChildSpec, run_child, shell_argv

#: First words that need no executable on PATH (shell builtins and keywords).
_SHELL_WORDS = frozenset(
    {
        "cd", "export", "test", "[", "[[", "true", "false", "echo", "exit", ":", ".",
        "source", "set", "unset", "eval", "exec", "printf", "read", "shift", "trap",
        "wait", "umask", "command", "type", "if", "for", "while", "until", "case", "{",
        "(", "!",
    }
)


class VerifierCore:
    """Runs gates in order, every one of them, and reports each as a GateResult."""

    def __init__(self, *, agent_id: str, default_timeout_s: float = 600.0):
        self.agent_id = agent_id
        self.default_timeout_s = default_timeout_s

    async def verify(self, request: VerifyRequest) -> GateResults:
        """Run every gate of ``request`` in order, even after one has failed."""
        results = []
        for gate in request.gates:
            if gate.builtin == "doctor":
                results.append(self._doctor(request, gate))
            else:
                results.append(await self._command(request, gate))
        return GateResults(results=results)

    async def _command(self, request: VerifyRequest, gate: GateSpec) -> GateResult:
        assert gate.run is not None
        timeout = gate.timeout_s or self.default_timeout_s
        outcome = await run_child(
            ChildSpec(
                argv=shell_argv(gate.run),
                cwd=request.workdir,
                env={**os.environ, **request.env, **gate.env},
                timeout_s=timeout,
            )
        )
        problems = []
        if outcome.error is not None:
            problems.append(outcome.error)
        elif outcome.timed_out:
            problems.append(f"timed out after {timeout:g} s; its process tree was killed")
        elif outcome.exit_code != 0:
            problems.append(f"exited with code {outcome.exit_code}")
        return GateResult(
            task_id=request.task_id,
            iteration=request.iteration,
            gate=gate.name,
            kind="command",
            passed=not problems,
            exit_code=outcome.exit_code,
            stdout_tail=outcome.stdout_tail,
            stderr_tail=outcome.stderr_tail,
            problems=problems,
            started_at=outcome.started_at,
            finished_at=outcome.finished_at,
            duration_s=outcome.duration_s,
            agent_id=self.agent_id,
        )

    def _doctor(self, request: VerifyRequest, gate: GateSpec) -> GateResult:
        started_at, t0 = utcnow(), time.monotonic()
        problems = _workdir_problems(request.workdir)
        for other in request.gates:
            if other.run is not None:
                env = {**os.environ, **request.env, **other.env}
                problems += _command_problems(other, request.workdir, env.get("PATH"))
        return GateResult(
            task_id=request.task_id,
            iteration=request.iteration,
            gate=gate.name,
            kind="doctor",
            passed=not problems,
            stdout_tail="\n".join(problems),
            problems=problems,
            started_at=started_at,
            finished_at=utcnow(),
            duration_s=time.monotonic() - t0,
            agent_id=self.agent_id,
        )


def _workdir_problems(workdir: str) -> list[str]:
    if not os.path.exists(workdir):
        return [f"workdir {workdir} does not exist"]
    if not os.path.isdir(workdir):
        return [f"workdir {workdir} is not a directory"]
    try:
        # Creating a file is the only check that sees read-only mounts and ACLs.
        fd, path = tempfile.mkstemp(prefix=".hivebus-doctor-", dir=workdir)
        os.close(fd)
        os.remove(path)
    except OSError as exc:
        return [f"workdir {workdir} is not writable: {exc.strerror or exc}"]
    return []


def _command_problems(gate: GateSpec, workdir: str, path_env: str | None) -> list[str]:
    assert gate.run is not None
    try:
        words = shlex.split(gate.run)
    except ValueError as exc:
        return [f"gate {gate.name}: cannot parse its command ({exc})"]
    # Leading NAME=value words set the environment of the command that follows.
    while words and "=" in words[0]:
        words.pop(0)
    if not words:
        return []
    word = words[0]
    if word in _SHELL_WORDS or "$" in word or "`" in word:
        return []
    if "/" in word:
        path = os.path.join(workdir, word)
        if not (os.path.isfile(path) and os.access(path, os.X_OK)):
            return [f"gate {gate.name}: {word} is not an executable file in {workdir}"]
        return []
    if shutil.which(word, path=path_env) is None:
        return [f"gate {gate.name}: command {word!r} is not on PATH"]
    return []

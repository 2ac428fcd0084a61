"""The execution policy: which programs, callables, workdirs and environment a task may use.

Default deny. A policy is checked against a plan before anything of it runs
(``Policy.check``); a task whose plan breaks it is refused with the rule that refused it.

A policy file (YAML)::

    executables:                 # programs a shell item or gate may start
      - make
      - python
      - name: git                # with ``args``: the arguments, joined by single
        args: ["status", "diff( .*)?"]   # spaces, must fullmatch one of the patterns
      - /opt/tools/bin/lint      # an absolute path allows exactly that file
    workdir_programs: false      # also allow programs inside the workdir (./build.sh)
    callables: [steps, mypkg.sub]   # modules (and their submodules) a call item may import
    workdir_modules: false       # also allow any module found in the workdir
    workdirs: [/srv/tasks]       # allowed workdir prefixes (relative: to this file)
    env: [CI, "PYTEST_*"]        # environment variables a task may pass (* patterns)
    deny_env: [...]              # refused even when ``env`` allows them (default below)
    confined: [rm, mv, ...]      # programs whose path arguments must stay in the workdir
    confine_redirects: true      # output redirections (> file) must stay in the workdir
    prompts: false               # LLM prompt items

How shell commands are checked: a command line is split into its simple commands at
``;``, ``&&``, ``||``, ``|``, ``&``, newlines and parentheses, with quotes, escapes, comments
and here-documents understood as ``sh`` does. Each simple command's program must be
allowed; the programs run by ``env``, ``timeout``, ``nice``, ``nohup``, ``time``, ``stdbuf``,
``command``, ``exec``, ``xargs``, ``find -exec``, ``sh -c``/``bash -c`` and ``eval`` are
checked too, and so are the scripts of ``trap``. Command substitution (``$(...)``,
backticks, ``<(...)``) runs a shell, so it is refused unless the policy allows ``sh``
explicitly, and the commands inside are checked as well. Refused because they cannot be
checked: a program computed at run time (``$CMD args``), a shell or ``source`` reading
its commands from stdin or a device, ``eval`` of computed text, ``xargs`` feeding paths to
a confined program, a confined path computed at run time (``rm -rf "$DIR"``), and
setting a ``deny_env`` variable in the command line (``PATH=... git``, ``export``,
``read``, ``printf -v``). ``cd`` is followed so that confined paths resolve where the
shell would resolve them. ``case`` statements and shell functions are refused (write a
script instead).

What a policy does not do: it checks the commands a task names, not what the programs it
allows do afterwards. ``python``, ``make``, ``npm`` or a script in the workdir can run
anything the hive's user may run; ``pip``, ``npm``, ``cargo``, ``go`` and ``git`` reach the
network. For tasks you do not trust, run the hive in a container or as a dedicated user.
"""

from __future__ import annotations

import fnmatch
import glob
import importlib
import importlib.machinery
import os
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from schemas.errors import validation_problems
from schemas import GateSpec, HivebusError, Model, WorkItemSpec

Rule = Literal[
    "executables", "args", "shell", "confined", "callables", "workdirs", "env", "prompts",
]

#: The programs of the built-in ``local`` policy: shell builtins, the usual command-line
#: tools and the developer tools people run in a project. Deliberately absent: network
#: clients (curl, wget, nc, ssh, scp, rsync, telnet, ftp), privilege and system tools
#: (sudo, su, doas, dd, mkfs, mount, chroot, chown, kill, systemctl, crontab, setsid)
#: and the hive's own control planes (nats, ray, docker, kubectl).
LOCAL_EXECUTABLES: tuple[str, ...] = (
    # shell builtins and keywords the shell runs as commands
    ":", ".", "[", "[[", "break", "builtin", "cd", "command", "continue", "declare",
    "echo", "eval", "exec", "exit", "export", "false", "getopts", "let", "local",
    "printf", "pwd", "read", "readonly", "return", "set", "shift", "source", "test", "trap",
    "true", "type", "umask", "unset", "wait", "sh", "bash",
    # files and text
    "basename", "base64", "cat", "chmod", "cksum", "cmp", "column", "comm", "cp", "csplit",
    "cut", "date", "df", "diff", "dirname", "du", "egrep", "env", "expand", "fgrep", "file",
    "find", "fmt", "fold", "grep", "gunzip", "gzip", "head", "hexdump", "id", "jq", "join",
    "ln", "ls", "md5sum", "mkdir", "mktemp", "mv", "nice", "nl", "nohup", "od", "paste",
    "patch", "printenv", "readlink", "realpath", "rev", "rg", "rm", "rmdir", "sed", "seq",
    "sha1sum", "sha256sum", "sha512sum", "sleep", "sort", "split", "stat", "stdbuf", "tail",
    "tar", "tee", "time", "timeout", "touch", "tr", "truncate", "uname", "uniq", "unzip",
    "wc", "which", "whoami", "xargs", "xxd", "xz", "yes", "yq", "zcat", "zip", "awk", "gawk",
    "bzip2",
    # developer tools
    "python", "python3", "pip", "pip3", "pytest", "ruff", "black", "isort", "mypy", "pyright",
    "flake8", "pylint", "coverage", "tox", "nox", "uv", "poetry", "hatch",
    "make", "cmake", "ninja", "cc", "c++", "gcc", "g++", "clang", "clang++",
    "git", "node", "npm", "npx", "yarn", "pnpm", "tsc",
    "cargo", "rustc", "rustfmt", "go", "gofmt", "java", "javac", "mvn", "gradle",
    "ruby", "gem", "bundle", "rake",
)

#: (``alias`` and ``hash`` are left out: they can make an allowed name run another program.)

#: Programs whose path arguments must resolve inside the workdir: the ones that delete,
#: move, link, change or create files.
CONFINED_DEFAULT: tuple[str, ...] = (
    "rm", "rmdir", "unlink", "shred", "mv", "cp", "ln", "chmod", "chown", "chgrp", "touch",
    "mkdir", "tee", "truncate", "install",
)

#: Environment variables refused even when ``env`` allows them: they change which
#: programs run or inject code into every program (PATH would let ``git`` be any file).
DENY_ENV_DEFAULT: tuple[str, ...] = (
    "PATH", "LD_*", "DYLD_*", "BASH_ENV", "ENV", "IFS", "PS4", "SHELLOPTS", "BASHOPTS",
    "PROMPT_COMMAND", "PYTHONSTARTUP", "PYTHONINSPECT", "NODE_OPTIONS", "PERL5OPT",
    "RUBYOPT", "GIT_SSH", "GIT_SSH_COMMAND", "GIT_EXEC_PATH", "HIVEBUS_*",
)

_MODULE = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"
#: Places a redirection may write to outside the workdir.
_DEVICES = ("/dev/null", "/dev/stdout", "/dev/stderr", "/dev/tty")
#: Files outside the workdir that hivebus itself gives a work item to write.
_HIVEBUS_FILES = ("$HIVEBUS_HANDOFF",)
_MAX_DEPTH = 16


class PolicyFileError(HivebusError):
    """A policy file that cannot be used: names the file and each problem."""

    def __init__(self, path: str, problems: list[str]):
        self.path = path
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(f"{path}: not a valid policy file:\n{lines}")


class ExecutableRule(Model):
    """One allowed program: a bare name (matched against the command's basename) or an
    absolute path (that file only); with ``args``, its arguments joined by single spaces
    must fullmatch one of the patterns."""

    name: Annotated[str, Field(min_length=1)]
    args: list[str] | None = None

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, data: Any) -> Any:
        return {"name": data} if isinstance(data, str) else data

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if "/" in value and not value.startswith("/"):
            raise ValueError(f"{value!r}: give a bare program name or an absolute path")
        return value

    @field_validator("args")
    @classmethod
    def _patterns(cls, value: list[str] | None) -> list[str] | None:
        for pattern in value or ():
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"{pattern!r} is not a regular expression: {exc}") from None
        return value

    def allows_args(self, args: Sequence[str]) -> bool:
        if self.args is None:
            return True
        joined = " ".join(args)
        return any(re.fullmatch(pattern, joined) for pattern in self.args)


class Violation(Model):
    """A part of a task the policy refuses, and the rule that refused it."""

    item_id: str
    rule: Rule
    message: str
    kind: Literal["work item", "gate", "task"] = "work item"

    def __str__(self) -> str:
        where = "task" if self.kind == "task" else f"{self.kind} {self.item_id!r}"
        return f"{where}: {self.message} (rule: {self.rule})"


class Policy(Model):
    """An execution policy (see the module docstring). Build one with ``Policy.load``,
    ``Policy.local`` or ``Policy.deny_all``; ``check`` a plan against it."""

    name: str = "custom"
    executables: list[ExecutableRule] = Field(default_factory=list)
    workdir_programs: bool = False
    callables: list[Annotated[str, Field(pattern=_MODULE)]] = Field(default_factory=list)
    workdir_modules: bool = False
    workdirs: list[str] = Field(default_factory=list)
    env: list[str] = Field(default_factory=list)
    deny_env: list[str] = Field(default_factory=lambda: list(DENY_ENV_DEFAULT))
    confined: list[str] = Field(default_factory=lambda: list(CONFINED_DEFAULT))
    confine_redirects: bool = True
    prompts: bool = False

    @field_validator("workdirs")
    @classmethod
    def _absolute(cls, value: list[str]) -> list[str]:
        expanded = [os.path.expanduser(path) for path in value]
        for path in expanded:
            if not os.path.isabs(path):
                raise ValueError(f"{path!r}: workdirs must be absolute paths")
        return expanded

    # -- the three ways to get one ---------------------------------------------------------

    @classmethod
    def load(cls, path: str | Path) -> Policy:
        """Read a YAML (or JSON) policy file; relative ``workdirs`` are relative to it.

        Raises PolicyFileError naming the file, the field and the reason.
        """
        path = Path(path)
        shown = str(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise PolicyFileError(shown, ["no such file"]) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyFileError(shown, [f"cannot be read: {exc}"]) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
            problem = getattr(exc, "problem", None) or exc
            raise PolicyFileError(shown, [f"{where}not valid YAML: {problem}"]) from None
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise PolicyFileError(shown, ["the file must hold a mapping (executables, workdirs, ...)"])
        base = path.resolve().parent
        if isinstance(data.get("workdirs"), list):
            data["workdirs"] = [
                str(base / os.path.expanduser(w)) if isinstance(w, str) else w for w in data["workdirs"]
            ]
        data.setdefault("name", path.stem)
        try:
            return cls.model_validate(data)
        except ValidationError as exc:
            raise PolicyFileError(shown, validation_problems(exc)) from None

    @classmethod
    def local(cls, root: str | Path) -> Policy:
        """The built-in ``local`` policy: workdirs inside ``root``, the programs of
        ``LOCAL_EXECUTABLES`` and any program or module inside the workdir, every
        environment variable but those of ``DENY_ENV_DEFAULT``, prompt items."""
        return cls(
            name="local",
            executables=[ExecutableRule(name=name) for name in LOCAL_EXECUTABLES],
            workdir_programs=True,
            workdir_modules=True,
            workdirs=[os.path.abspath(root)],
            env=["*"],
            prompts=True,
        )

    @classmethod
    def deny_all(cls) -> Policy:
        """Refuses every task (``hivebus up`` without ``--policy``)."""
        return cls(name="deny-all")

    # -- checking ---------------------------------------------------------------------

    def check(self, items: Sequence[WorkItemSpec], *, workdir: str,
              gates: Sequence[GateSpec] = (), env: Mapping[str, str] | None = None,
              base: str | None = None) -> list[Violation]:
        """Every violation of this policy by a plan: its work items, gates, workdir and
        task-level ``env``. A relative ``workdir`` is taken relative to ``base`` (default:
        the current directory). An empty list means the plan may run."""
        found: list[Violation] = []
        path = os.path.join(base or os.getcwd(), os.path.expanduser(workdir))
        real = os.path.realpath(path)
        roots = [os.path.realpath(root) for root in self.workdirs]
        if not any(_inside(real, root) for root in roots):
            allowed = ", ".join(self.workdirs) or "none"
            shown = workdir if real == os.path.normpath(path) else f"{workdir} (resolves to {real})"
            found.append(Violation(item_id="", kind="task", rule="workdirs", message=(
                f"workdir {shown} is outside the allowed directories ({allowed})")))
        for name in env or {}:
            if (reason := self._env_refusal(name)) is not None:
                found.append(Violation(item_id="", kind="task", rule="env", message=reason))
        for item in items:
            found += self._check_item(item, real)
        for gate in gates:
            found += [Violation(item_id=gate.name, kind="gate", rule=rule, message=message)
                      for rule, message in self._check_gate(gate, real)]
        return found

    def allows_env(self, name: str) -> bool:
        return self._env_refusal(name) is None

    def _env_refusal(self, name: str) -> str | None:
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.deny_env):
            return f"environment variable {name!r} may not be set by a task"
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.env):
            return f"environment variable {name!r} is not allowed to pass"
        return None

    def _check_item(self, item: WorkItemSpec, workdir: str) -> list[Violation]:
        problems: list[tuple[Rule, str]] = []
        for name in item.env:
            if (reason := self._env_refusal(name)) is not None:
                problems.append(("env", reason))
        if item.run is not None:
            problems += _ShellCheck(self, workdir).run(item.run)
        elif item.call is not None:
            problems += self._check_call(item.call, workdir)
        elif item.prompt is not None:
            if not self.prompts:
                problems.append(("prompts", "prompt items are not allowed"))
        elif item.subtask is not None:
            sub = item.subtask
            nested = self.check([*sub.work_items, *sub.on_gate_failure], workdir=sub.workdir,
                                gates=sub.gates, env=sub.env, base=workdir)
            return [Violation(item_id=item.id, rule=rule, message=message)
                    for rule, message in problems] + [
                Violation(item_id=item.id, rule=v.rule,
                          message=f"in its subtask, {str(v).removesuffix(f' (rule: {v.rule})')}")
                for v in nested]
        return [Violation(item_id=item.id, rule=rule, message=message) for rule, message in problems]

    def _check_gate(self, gate: GateSpec, workdir: str) -> list[tuple[Rule, str]]:
        problems: list[tuple[Rule, str]] = []
        for name in gate.env:
            if (reason := self._env_refusal(name)) is not None:
                problems.append(("env", reason))
        if gate.run is not None:  # the built-in doctor runs nothing of the task's
            problems += _ShellCheck(self, workdir).run(gate.run)
        return problems

    def _check_call(self, target: str, workdir: str) -> list[tuple[Rule, str]]:
        module = target.partition(":")[0]
        if any(module == prefix or module.startswith(prefix + ".") for prefix in self.callables):
            return []
        if not self.workdir_modules:
            return [("callables", f"module {module!r} is not an allowed callable module")]
        top = module.split(".")[0]
        if top in sys.stdlib_module_names:
            return [("callables", f"{module!r} is a standard-library module; a call item may "
                                  "only import modules of its workdir")]
        where = _module_location(module, workdir)
        if where is None:
            return [("callables", f"module {module!r} is not in the workdir {workdir}")]
        outside = [p for p in where if not _inside(os.path.realpath(p), workdir)]
        if outside:
            return [("callables", f"module {module!r} resolves to {outside[0]}, outside the "
                                  f"workdir {workdir}")]
        return []

    def _rule_for(self, program: str, cwd: str | None, workdir: str) -> ExecutableRule | None:
        """The rule that allows ``program`` (a command's first word), if any."""
        base = os.path.basename(program)
        real: str | None = None
        if "/" in program and (cwd is not None or os.path.isabs(program)):
            real = os.path.realpath(os.path.join(cwd or "/", program))
        for rule in self.executables:
            if rule.name.startswith("/"):
                target = os.path.realpath(rule.name)
                if real == target or ("/" not in program and base == os.path.basename(rule.name)
                                      and _which(program) == target):
                    return rule
            elif base == rule.name:
                return rule
        if self.workdir_programs and real is not None and _inside(real, workdir):
            return ExecutableRule(name=real)
        return None

    @property
    def allows_shell(self) -> bool:
        """Whether ``sh`` is allowed explicitly (command substitution needs it)."""
        return any(rule.name in ("sh", "/bin/sh") and rule.args is None for rule in self.executables)


def _inside(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _which(program: str) -> str | None:
    found = shutil.which(program)
    return os.path.realpath(found) if found else None


def _module_location(module: str, workdir: str) -> list[str] | None:
    """The files and folders ``module`` would be imported from with ``workdir`` first on
    sys.path (as the call runner imports it), or None when it is not there."""
    importlib.invalidate_caches()  # the workdir may have changed since the last look
    parts = module.split(".")
    search = [workdir]
    found: list[str] = []
    for depth in range(len(parts)):
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: depth + 1]), search)
        if spec is None:
            return None
        if spec.origin and spec.origin not in ("namespace", "built-in", "frozen"):
            found.append(spec.origin)
        locations = list(spec.submodule_search_locations or [])
        found += locations
        search = locations
    return found


# -- shell commands --------------------------------------------------------------------------

class _ShellSyntax(Exception):
    pass


_OPERATORS = sorted(
    ["&&", "||", ";;", ";&", "|&", "<<<", "<<-", "<<", ">>", "&>>", "&>", ">&", "<&", ">|",
     "<>", ";", "&", "|", "(", ")", "<", ">", "\n"],
    key=len, reverse=True,
)
_REDIRECTS = {"<", ">", ">>", "<<", "<<-", "<<<", "&>", "&>>", ">&", "<&", ">|", "<>"}
_OUTPUT_REDIRECTS = {">", ">>", "&>", "&>>", ">|", "<>", ">&"}
_LEADING_WORDS = {"!", "{", "}", "if", "then", "elif", "else", "do", "while", "until", "fi",
                  "done", "esac", "time"}
_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\[[^]]*\])?\+?=")
_SHELLS = {"sh", "bash", "dash", "zsh", "ksh"}
_REMOVERS = {"rm", "rmdir", "unlink"}
_SETTERS = {"export", "declare", "local", "readonly", "typeset"}
#: Wrappers that run the rest of their arguments as a command, and their options that
#: take a value.
_WRAPPERS: dict[str, set[str]] = {
    "nohup": set(), "builtin": set(), "exec": {"-a"}, "command": set(),
    "nice": {"-n", "--adjustment"}, "stdbuf": {"-i", "-o", "-e", "--input", "--output", "--error"},
    "time": {"-f", "-o", "--format", "--output"},
    "timeout": {"-s", "-k", "--signal", "--kill-after"},
    "env": {"-u", "-C", "--unset", "--chdir"},
    "xargs": {"-a", "-d", "-E", "-e", "-I", "-i", "-L", "-l", "-n", "-P", "-s", "--arg-file",
              "--delimiter", "--eof", "--replace", "--max-lines", "--max-args", "--max-procs",
              "--max-chars", "--process-slot-var"},
}


@dataclass
class _Word:
    text: str = ""
    lead: str = ""  # the text before the first quote, escape or expansion
    plain: bool = True  # nothing quoted, escaped or expanded so far
    quoted: bool = False
    dynamic: bool = False  # holds a $ expansion or a command substitution
    glob: bool = False
    tilde: bool = False
    substitutions: list[str] = field(default_factory=list)


@dataclass
class _Op:
    text: str


@dataclass
class _Command:
    words: list[_Word] = field(default_factory=list)
    redirects: list[tuple[str, _Word]] = field(default_factory=list)


def _matching(text: str, start: int, open_: str, close: str) -> int:
    """Index of the ``close`` that ends the group opened just before ``start``."""
    depth, i, n = 1, start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
            continue
        if c == "'":
            j = text.find("'", i + 1)
            if j < 0:
                break
            i = j + 1
            continue
        if c == '"':
            i = _end_of_double(text, i + 1) + 1
            continue
        if c == "`":
            i = _end_of_backtick(text, i + 1) + 1
            continue
        if c == open_:
            depth += 1
        elif c == close:
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise _ShellSyntax(f"no closing {close!r}")


def _end_of_double(text: str, start: int) -> int:
    i, n = start, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            i += 2
        elif c == '"':
            return i
        elif text.startswith("$(", i):
            i = _matching(text, i + 2, "(", ")") + 1
        elif c == "`":
            i = _end_of_backtick(text, i + 1) + 1
        else:
            i += 1
    raise _ShellSyntax("unterminated double quote")


def _end_of_backtick(text: str, start: int) -> int:
    i, n = start, len(text)
    while i < n:
        if text[i] == "\\":
            i += 2
        elif text[i] == "`":
            return i
        else:
            i += 1
    raise _ShellSyntax("unterminated backtick")


def _substitutions_in(text: str) -> list[str]:
    """The command substitutions in text where quotes are literal (a here-document)."""
    found, i = [], 0
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text.startswith("$((", i):
            end = _matching(text, i + 3, "(", ")")
            found += _substitutions_in(text[i + 3:end])
            i = end + 1
        elif text.startswith("$(", i):
            end = _matching(text, i + 2, "(", ")")
            found.append(text[i + 2:end])
            i = end + 1
        elif text[i] == "`":
            end = _end_of_backtick(text, i + 1)
            found.append(text[i + 1:end].replace("\\`", "`"))
            i = end + 1
        else:
            i += 1
    return found


def _dollar(text: str, i: int, word: _Word) -> int:
    """Read the expansion starting at ``text[i] == "$"`` into ``word``; the index after it."""
    if text.startswith("$((", i):
        end = _matching(text, i + 3, "(", ")")
        word.substitutions += _substitutions_in(text[i + 3:end])
        end = end + 2 if text.startswith("))", end) else end + 1
    elif text.startswith("$(", i):
        end = _matching(text, i + 2, "(", ")")
        word.substitutions.append(text[i + 2:end])
        end += 1
    elif text.startswith("${", i):
        end = _matching(text, i + 2, "{", "}")
        body = text[i + 2:end]
        if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", body):  # ${NAME} reads as $NAME
            word.text += "$" + body
            word.dynamic = True
            return end + 1
        word.substitutions += _substitutions_in(body)
        end += 1
    else:
        following = text[i + 1:i + 2]
        if following and (following.isalnum() or following in "_@*#?$!-"):
            word.dynamic = True
        word.text += "$"
        return i + 1
    word.text += "\0"
    word.dynamic = True
    return end


def _backtick(text: str, i: int, word: _Word) -> int:
    end = _end_of_backtick(text, i + 1)
    word.substitutions.append(text[i + 1:end].replace("\\`", "`"))
    word.text += "\0"
    word.dynamic = True
    return end + 1


def _lex(text: str) -> list[_Word | _Op]:
    """Split a command line into words and operators the way ``sh`` does."""
    tokens: list[_Word | _Op] = []
    word: _Word | None = None
    heredocs: list[tuple[_Word, bool]] = []  # delimiter word, strip leading tabs
    want_delimiter: bool | None = None
    i, n = 0, len(text)

    def current(plain: bool = False) -> _Word:
        nonlocal word
        if word is None:
            word = _Word()
        if not plain:
            word.plain = False
        return word

    def flush() -> None:
        nonlocal word, want_delimiter
        if word is not None:
            tokens.append(word)
            if want_delimiter is not None:
                heredocs.append((word, want_delimiter))
                want_delimiter = None
            word = None

    while i < n:
        c = text[i]
        if c == "\\":
            if text.startswith("\\\n", i):
                i += 2
                continue
            w = current()
            w.text += text[i + 1:i + 2]
            w.quoted = True
            i += 2
        elif c == "'":
            end = text.find("'", i + 1)
            if end < 0:
                raise _ShellSyntax("unterminated single quote")
            w = current()
            w.text += text[i + 1:end]
            w.quoted = True
            i = end + 1
        elif c == '"':
            end = _end_of_double(text, i + 1)
            w = current()
            w.quoted = True
            inner, j = text[i + 1:end], 0
            while j < len(inner):
                if inner[j] == "\\" and inner[j + 1:j + 2] in ("$", "`", '"', "\\", "\n"):
                    w.text += inner[j + 1].replace("\n", "")
                    j += 2
                elif inner[j] == "$":
                    j = _dollar(inner, j, w)
                elif inner[j] == "`":
                    j = _backtick(inner, j, w)
                else:
                    w.text += inner[j]
                    j += 1
            i = end + 1
        elif c == "`":
            i = _backtick(text, i, current())
        elif c == "$":
            i = _dollar(text, i, current())
        elif c in " \t":
            flush()
            i += 1
        elif c == "#" and word is None:
            end = text.find("\n", i)
            i = n if end < 0 else end
        elif c in "<>" and text.startswith("(", i + 1) and word is None:
            w = current()
            end = _matching(text, i + 2, "(", ")")
            w.substitutions.append(text[i + 2:end])
            w.text += "\0"
            w.dynamic = True
            i = end + 1
        elif c in ";&|()<>\n":
            if word is not None and c in "<>" and word.plain and word.text.isdigit():
                word = None  # an io number: the 2 of 2>&1
            flush()
            op = next(o for o in _OPERATORS if text.startswith(o, i))
            i += len(op)
            if op == "\n":
                tokens.append(_Op(";"))
                i = _read_heredocs(text, i, heredocs)
                heredocs = []
                continue
            tokens.append(_Op(op))
            if op in ("<<", "<<-"):
                want_delimiter = op == "<<-"
        else:
            w = current(plain=True)
            if not w.text and c == "~":
                w.tilde = True
            if c in "*?[":
                w.glob = True
            if w.plain:
                w.lead += c
            w.text += c
            i += 1
    flush()
    if heredocs:
        _read_heredocs(text, n, heredocs)
    return tokens


def _read_heredocs(text: str, i: int, heredocs: list[tuple[_Word, bool]]) -> int:
    """Consume the bodies of the pending here-documents from ``text[i:]``; a body whose
    delimiter is unquoted is expanded by the shell, so its substitutions are recorded on
    the delimiter word."""
    for delimiter, strip_tabs in heredocs:
        lines: list[str] = []
        while i < len(text):
            end = text.find("\n", i)
            line = text[i:] if end < 0 else text[i:end]
            i = len(text) if end < 0 else end + 1
            if (line.lstrip("\t") if strip_tabs else line) == delimiter.text:
                break
            lines.append(line)
        if not delimiter.quoted:
            delimiter.substitutions += _substitutions_in("\n".join(lines))
    return i


def _commands(tokens: list[_Word | _Op]) -> list[_Command]:
    commands: list[_Command] = [_Command()]
    redirect: str | None = None
    for token in tokens:
        if isinstance(token, _Op):
            if redirect is not None:
                raise _ShellSyntax(f"{redirect!r} without a file")
            if token.text in _REDIRECTS:
                redirect = token.text
            else:
                commands.append(_Command())
        elif redirect is not None:
            commands[-1].redirects.append((redirect, token))
            redirect = None
        else:
            commands[-1].words.append(token)
    if redirect is not None:
        raise _ShellSyntax(f"{redirect!r} without a file")
    return [c for c in commands if c.words or c.redirects]


class _ShellCheck:
    """Checks one shell command line against a policy, following ``cd``."""

    def __init__(self, policy: Policy, workdir: str):
        self.policy = policy
        self.workdir = workdir
        self.problems: list[tuple[Rule, str]] = []

    def run(self, text: str) -> list[tuple[Rule, str]]:
        self._script(text, self.workdir, depth=0)
        seen: set[tuple[Rule, str]] = set()
        return [p for p in self.problems if not (p in seen or seen.add(p))]

    def _refuse(self, rule: Rule, message: str) -> None:
        self.problems.append((rule, message))

    def _script(self, text: str, cwd: str | None, *, depth: int) -> str | None:
        """Check a whole command line; returns the directory it ends in (None: unknown)."""
        if depth > _MAX_DEPTH:
            self._refuse("shell", "commands are nested too deeply to check")
            return cwd
        try:
            commands = _commands(_lex(text))
        except _ShellSyntax as exc:
            self._refuse("shell", f"cannot read the command {_short(text)!r}: {exc}")
            return cwd
        for command in commands:
            cwd = self._command(command, cwd, depth=depth)
        return cwd

    def _substitutions(self, words: Iterable[_Word], cwd: str | None, depth: int) -> None:
        for word in words:
            for body in word.substitutions:
                if not self.policy.allows_shell:
                    self._refuse("shell", f"command substitution ({_short(body)!r}) needs 'sh' "
                                          "in the policy's executables")
                self._script(body, cwd, depth=depth + 1)

    def _command(self, command: _Command, cwd: str | None, *, depth: int) -> str | None:
        self._substitutions([*command.words, *(w for _, w in command.redirects)], cwd, depth)
        for op, target in command.redirects:
            if self.policy.confine_redirects and op in _OUTPUT_REDIRECTS:
                if op == ">&" and (target.text.isdigit() or target.text == "-"):
                    continue
                if target.text in _DEVICES or target.text.startswith("/dev/fd/"):
                    continue
                self._confine(target, cwd, action=f"the redirection {op} would write")
        words = list(command.words)
        while words and not words[0].quoted and words[0].text in _LEADING_WORDS:
            words.pop(0)
        if not words:
            return cwd
        first = words[0]
        if not first.quoted and first.text in ("for", "select", "in"):
            return cwd  # a loop header: its words were checked for substitutions above
        if not first.quoted and first.text in ("case", "function"):
            self._refuse("shell", f"'{first.text}' is not supported by the policy check; "
                                  "put the logic in a script")
            return cwd
        while words and _ASSIGNMENT.match(words[0].lead):
            self._variable(words.pop(0).lead.partition("=")[0])
        if not words:
            return cwd
        return self._simple(words, cwd, depth=depth)

    def _simple(self, words: list[_Word], cwd: str | None, *, depth: int) -> str | None:
        program, args = words[0], words[1:]
        if program.dynamic or program.glob:
            self._refuse("executables", f"the program of {_short(_join(words))!r} is computed "
                                        "when it runs; name it literally")
            return cwd
        name = os.path.expanduser(program.text) if program.tilde else program.text
        rule = self.policy._rule_for(name, cwd, self.workdir)
        if rule is None:
            self._refuse("executables", f"{name!r} is not an allowed executable")
            return cwd
        if not rule.allows_args([a.text for a in args]):
            self._refuse("args", f"the arguments of {name!r} ({_short(_join(args))!r}) match "
                                 f"none of its allowed patterns")
        base = os.path.basename(name)
        if base == "cd":
            return self._cd(args, cwd)
        if base in ("pushd", "popd"):
            return None
        if base == "env" and any(a.text.startswith(("-S", "--split-string")) for a in args):
            self._refuse("shell", "'env -S' splits a string into a command; name the command directly")
        elif base in _WRAPPERS:
            inner = _wrapped(base, args)
            if inner:
                if base == "xargs" and os.path.basename(inner[0].text) in self.policy.confined:
                    self._refuse("confined", f"'xargs {inner[0].text}' takes its paths from "
                                             "stdin, where they cannot be checked")
                self._simple(inner, cwd, depth=depth + 1)
        elif base in _SHELLS or base in (".", "source"):
            script = _shell_script(args) if base in _SHELLS else None
            if script is not None:
                if script.dynamic:
                    self._refuse("shell", f"the script of '{base} -c' is computed when it runs")
                else:
                    self._script(script.text, cwd, depth=depth + 1)
            else:
                source = _script_file(args) if base in _SHELLS else (args[0] if args else None)
                if source is None or source.dynamic or source.text.startswith(("/dev/", "/proc/")):
                    where = "stdin" if source is None else _shown(source)
                    self._refuse("shell", f"'{base}' would read its commands from {where}, where "
                                          "they cannot be checked; use -c or a script file")
        elif base in ("eval", "trap"):
            script_args = args if base == "eval" else args[:1]
            if any(a.dynamic for a in script_args):
                self._refuse("shell", f"'{base}' of text computed when it runs cannot be checked")
            elif script_args and not (base == "trap" and script_args[0].text.startswith("-")):
                self._script(" ".join(a.text for a in script_args), cwd, depth=depth + 1)
        if base in _SETTERS or base == "env":
            for word in args:
                self._variable(word.lead.partition("=")[0] if "=" in word.lead else None)
        elif base in ("read", "printf"):
            names = [a for a in args if not a.text.startswith("-")] if base == "read" else \
                [b for a, b in zip(args, args[1:]) if a.text == "-v"]
            for word in names:
                self._variable(word.text)
        elif base == "find":
            self._find(args, cwd, depth=depth)
        if base in self.policy.confined:
            for path in _path_arguments(args, self):
                # rm removes a symlink itself, not what it points to
                self._confine(path, cwd, action=f"{base!r} would change", follow=base not in _REMOVERS)
        return cwd

    def _variable(self, name: str | None) -> None:
        """Refuse a shell assignment to a variable of ``deny_env`` (PATH=..., export LD_PRELOAD=...)."""
        name = (name or "").partition("[")[0].removesuffix("+")
        if name and any(fnmatch.fnmatchcase(name, pattern) for pattern in self.policy.deny_env):
            self._refuse("env", f"the command sets {name}, which a task may not set")

    def _cd(self, args: list[_Word], cwd: str | None) -> str | None:
        targets = [a for a in args if not (a.text.startswith("-") and not a.quoted)]
        if not targets:
            return None if any(a.text == "-" for a in args) else os.path.realpath(os.path.expanduser("~"))
        target = targets[0]
        if target.dynamic:
            return None
        path = os.path.expanduser(target.text) if target.tilde else target.text
        if not os.path.isabs(path) and cwd is None:
            return None
        return os.path.realpath(os.path.join(cwd or "/", path))

    def _find(self, args: list[_Word], cwd: str | None, *, depth: int) -> None:
        starts: list[_Word] = []
        for word in args:
            if word.text.startswith(("-", "(", "!")) and not word.quoted:
                break
            starts.append(word)
        destructive = False
        k = 0
        while k < len(args):
            text = args[k].text
            if text in ("-exec", "-execdir", "-ok", "-okdir"):
                end = k + 1
                while end < len(args) and args[end].text not in (";", "+"):
                    end += 1
                inner = args[k + 1:end]
                if inner:
                    self._simple(inner, cwd, depth=depth + 1)
                    destructive |= os.path.basename(inner[0].text) in self.policy.confined
                k = end + 1
                continue
            if text == "-delete":
                destructive = True
            if text in ("-fprint", "-fprint0", "-fprintf", "-fls") and k + 1 < len(args):
                self._confine(args[k + 1], cwd, action=f"'find {text}' would write")
            k += 1
        if destructive:
            for start in starts or [_Word(text=".")]:
                self._confine(start, cwd, action="'find' would change files under")

    def _confine(self, path: _Word, cwd: str | None, *, action: str, follow: bool = True) -> None:
        """Refuse ``path`` unless it resolves inside the workdir. Symlinks are followed;
        with ``follow=False`` a last component without a trailing slash is not."""
        shown = _shown(path)
        if path.text in _HIVEBUS_FILES:
            return  # set by the executor, which a task cannot override (deny_env: HIVEBUS_*)
        if path.dynamic:
            self._refuse("confined", f"{action} {shown}, a path only known when it runs, "
                                     "which cannot be checked")
            return
        text = os.path.expanduser(path.text) if path.tilde else path.text
        if not os.path.isabs(text) and cwd is None:
            self._refuse("confined", f"{action} {shown}, relative to a directory only known "
                                     "when it runs (after cd)")
            return
        full = os.path.join(cwd or "/", text)
        for candidate in [full, *(glob.glob(full) if path.glob else [])]:
            if follow or candidate.endswith(("/", "/.")):
                real = os.path.realpath(candidate)
            else:
                parent, name = os.path.split(candidate)
                real = (os.path.realpath(candidate) if name in ("", ".", "..")
                        else os.path.join(os.path.realpath(parent), name))
            if not _inside(real, self.workdir):
                resolves = "" if real == os.path.normpath(candidate) else f" (resolves to {real})"
                self._refuse("confined", f"{action} {shown}{resolves}, outside the workdir "
                                         f"{self.workdir}")
                return


def _wrapped(wrapper: str, args: list[_Word]) -> list[_Word] | None:
    """The command a wrapper (env, timeout, xargs, ...) runs, or None."""
    takes_value = _WRAPPERS[wrapper]
    k = 0
    while k < len(args):
        text = args[k].text
        if text == "--":
            k += 1
            break
        if text.startswith("-") and len(text) > 1:
            if wrapper == "command" and text in ("-v", "-V"):
                return None  # command -v only looks the name up
            if text in takes_value:  # the value is the next argument (-n 1, not -n1 or --n=1)
                k += 2
            else:
                k += 1
            continue
        if wrapper == "env" and "=" in text:
            k += 1
            continue
        break
    if wrapper == "timeout" and k < len(args):
        k += 1  # the duration
    return args[k:] or None


def _shell_script(args: list[_Word]) -> _Word | None:
    """The script of ``sh -c SCRIPT``, or None when the shell runs a file or stdin."""
    k = 0
    while k < len(args):
        text = args[k].text
        if text in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            k += 2
            continue
        if text.startswith(("-", "+")) and not text.startswith("--"):
            if "c" in text[1:]:
                return args[k + 1] if k + 1 < len(args) else None
            k += 1
            continue
        if text.startswith("--"):
            k += 1
            continue
        return None
    return None


def _script_file(args: list[_Word]) -> _Word | None:
    """The script file a shell started with ``args`` (and no -c) runs; None for stdin."""
    k = 0
    while k < len(args):
        text = args[k].text
        if text == "-s":
            return None
        if text == "--":
            return args[k + 1] if k + 1 < len(args) else None
        if text in ("-o", "+o", "-O", "+O", "--rcfile", "--init-file"):
            k += 2
            continue
        if args[k].dynamic or not text.startswith(("-", "+")):
            return args[k]
        k += 1
    return None


def _path_arguments(args: list[_Word], check: _ShellCheck) -> list[_Word]:
    """The arguments of a confined program that name files: every operand, and the
    value of a long option given as ``--opt=value``."""
    paths: list[_Word] = []
    operands_only = False
    for word in args:
        text = word.text
        if operands_only or word.dynamic or not text.startswith("-") or text == "-":
            paths.append(word)
        elif text == "--":
            operands_only = True
        elif text.startswith("--") and "=" in text:
            value = text.split("=", 1)[1]
            paths.append(_Word(text=value, tilde=value.startswith("~"), glob=word.glob))
        elif not text.startswith("--") and "/" in text:
            check._refuse("confined", f"cannot tell whether the option {text!r} names a path; "
                                      "give the path as a separate argument")
    return paths


def _join(words: Sequence[_Word]) -> str:
    return " ".join(_shown(w) for w in words)


def _shown(word: _Word) -> str:
    return word.text.replace("\0", "$(...)")


def _short(text: str, limit: int = 80) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


__all__ = [
    "CONFINED_DEFAULT", "DENY_ENV_DEFAULT", "LOCAL_EXECUTABLES", "ExecutableRule", "Policy",
    "PolicyFileError", "Violation",
]

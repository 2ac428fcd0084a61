"""Security: NATS credentials and subject permissions on a real nats-server, the
execution policy, and secrets encrypted at rest and redacted. No Ray."""

from __future__ import annotations

import asyncio
import base64
import datetime
import ipaddress
import json
import os
import pickle
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from actors.policy import Policy, PolicyFileError, Violation
from actors.secrets import (
    KEY_ENV,
    SecretError,
    SecretStore,
    UnknownSecret,
    load_key,
    redact,
    redact_value,
    resolve_env,
)
from bus import Bus, EmbeddedNats, find_nats_server, subjects
from bus.auth import (
    NatsAuth,
    NatsAuthError,
    auth_from_options,
    ensure_credentials,
    load_role,
    role_file,
)
from schemas import (
    GateSpec,
    LifecycleEvent,
    ProgressEvent,
    TaskAccepted,
    TaskSpec,
    TransportError,
    WorkItemSpec,
)

# -- NATS: one authenticated embedded server for the module ---------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNats]:
    running = EmbeddedNats(tmp_path_factory.mktemp("secure-state"))
    running.start()
    try:
        yield running
    finally:
        running.stop()


class Errors:
    """A nats-py error callback that lets a test wait for a given error."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._changed = asyncio.Event()

    async def callback(self, exc: Exception) -> None:
        self.seen.append(str(exc))
        self._changed.set()

    async def wait_for(self, *needles: str, timeout: float = 5.0) -> str:
        async def look() -> str:
            while True:
                for text in self.seen:
                    if all(n.lower() in text.lower() for n in needles):
                        return text
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(look(), timeout)


async def synced(nc: nats.NATS) -> None:
    """Return once the server has processed everything sent on ``nc`` so far.

    nats-py 2.16 writes flush()'s PING straight to the socket while a SUB may still wait
    in its pending buffer; the second PING goes out after the flusher has sent it.
    """
    await nc.flush()
    await nc.flush()


async def raw(server: EmbeddedNats, role: str, errors: Errors) -> nats.NATS:
    auth = server.credentials(role)
    assert auth is not None
    return await nats.connect(server.url, error_cb=errors.callback, allow_reconnect=False,
                              **auth.connect_options())


def test_a_client_without_credentials_cannot_connect(server: EmbeddedNats) -> None:
    async def scenario() -> None:
        with pytest.raises(TransportError, match="requires credentials"):
            await Bus.connect(server.url, name="anonymous")
        with pytest.raises(nats.errors.Error, match="(?i)authorization violation"):
            await nats.connect(server.url, allow_reconnect=False, error_cb=Errors().callback)

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_wrong_password_is_refused_with_a_sentence_that_does_not_show_it(server: EmbeddedNats) -> None:
    async def scenario() -> str:
        with pytest.raises(TransportError) as caught:
            await Bus.connect(server.url, name="guess",
                              auth=NatsAuth(user="client", password="not-the-password"))
        return str(caught.value)

    message = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert message == f"NATS at {server.url} refused the credentials of user 'client'"
    assert "not-the-password" not in message


@pytest.mark.parametrize("subject", [
    subjects.TASK_SUBMIT, subjects.TASK_CANCEL, subjects.TASK_APPROVE,
    subjects.lifecycle("task-1"), subjects.completion("task-1"), subjects.EXECUTOR_RUN,
    "$JS.API.STREAM.DELETE.HIVEBUS_EVENTS",
])
def test_an_agent_may_not_publish_what_only_clients_or_the_orchestrator_may(
        server: EmbeddedNats, subject: str) -> None:
    async def scenario() -> None:
        errors = Errors()
        agent = await raw(server, "agent", errors)
        try:
            await agent.publish(subject, b"{}")
            await agent.flush()
            await errors.wait_for("permissions violation for publish", subject)
        finally:
            await agent.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_task_submitted_with_agent_credentials_never_reaches_the_orchestrator(server: EmbeddedNats) -> None:
    async def scenario() -> None:
        received: list[str] = []

        async def accept(spec: TaskSpec) -> TaskAccepted:
            received.append(spec.title)
            return TaskAccepted(task_id="task-accepted", state="QUEUED")

        orchestrator = await Bus.connect(server.url, name="orchestrator",
                                         auth=server.credentials("orchestrator"))
        errors = Errors()
        agent = await raw(server, "agent", errors)
        client = await Bus.connect(server.url, name="client", auth=server.credentials("client"))
        try:
            await orchestrator.serve(subjects.TASK_SUBMIT, TaskSpec, accept)
            await synced(orchestrator.nc)
            spec = TaskSpec(title="from an agent", work_items=[WorkItemSpec(id="a", run="true")])
            request = asyncio.ensure_future(
                agent.request(subjects.TASK_SUBMIT, spec.model_dump_json().encode(), timeout=10))
            await errors.wait_for("permissions violation for publish", subjects.TASK_SUBMIT)
            request.cancel()
            # The same request with client credentials is served: the responder was there.
            reply = await client.request(subjects.TASK_SUBMIT, spec.model_copy(update={"title": "from a client"}),
                                         TaskAccepted)
            assert reply.task_id == "task-accepted"
            assert received == ["from a client"]
        finally:
            await agent.close()
            await client.close()
            await orchestrator.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_client_cannot_subscribe_to_an_agents_subject_but_can_submit_and_watch(server: EmbeddedNats) -> None:
    async def scenario() -> None:
        orchestrator = await Bus.connect(server.url, name="orchestrator",
                                         auth=server.credentials("orchestrator"))
        client_bus = await Bus.connect(server.url, name="client", auth=server.credentials("client"))
        errors = Errors()
        client = await raw(server, "client", errors)
        try:
            stolen: list[bytes] = []
            watched: asyncio.Queue[LifecycleEvent] = asyncio.Queue()

            async def steal(msg: nats.aio.msg.Msg) -> None:
                stolen.append(msg.data)

            async def watch(event: LifecycleEvent) -> None:
                await watched.put(event)

            await client.subscribe(subjects.EXECUTOR_RUN, cb=steal)
            await client.flush()
            await errors.wait_for("permissions violation for subscription", subjects.EXECUTOR_RUN)
            await client_bus.subscribe("task.lifecycle.>", LifecycleEvent, watch)
            await synced(client_bus.nc)

            async def accept(spec: TaskSpec) -> TaskAccepted:
                return TaskAccepted(task_id="task-2", state="QUEUED")

            await orchestrator.serve(subjects.TASK_SUBMIT, TaskSpec, accept)
            await synced(orchestrator.nc)
            reply = await client_bus.request(
                subjects.TASK_SUBMIT, TaskSpec(title="t", gates=[GateSpec(name="g", run="true")]), TaskAccepted)
            assert reply.task_id == "task-2"

            await orchestrator.nc.publish(subjects.EXECUTOR_RUN, b"an assignment")
            await orchestrator.emit(subjects.lifecycle("task-2"), LifecycleEvent(task_id="task-2", state="QUEUED"))
            event = await asyncio.wait_for(watched.get(), 5)
            assert event.task_id == "task-2"
            assert stolen == []
        finally:
            await client.close()
            await client_bus.close()
            await orchestrator.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_a_client_may_not_send_work_to_executors_or_forge_events(server: EmbeddedNats) -> None:
    async def scenario() -> None:
        errors = Errors()
        client = await raw(server, "client", errors)
        try:
            for subject in (subjects.EXECUTOR_RUN, subjects.progress("task-1"), "$KV.hivebus_tasks.task-1"):
                await client.publish(subject, b"{}")
                await client.flush()
                await errors.wait_for("permissions violation for publish", subject)
        finally:
            await client.close()

    asyncio.run(asyncio.wait_for(scenario(), 30))


def test_agents_serve_and_publish_events_that_clients_read_from_the_stream(server: EmbeddedNats) -> None:
    async def scenario() -> None:
        orchestrator = await Bus.connect(server.url, name="orchestrator",
                                         auth=server.credentials("orchestrator"))
        agent = await Bus.connect(server.url, name="executor-1", auth=server.credentials("agent"))
        client = await Bus.connect(server.url, name="client", auth=server.credentials("client"))
        try:
            await orchestrator.ensure_streams()

            async def plan(spec: TaskSpec) -> TaskAccepted:
                return TaskAccepted(task_id="task-3", state="RUNNING")

            # allow_responses: the agent answers on the orchestrator's reply subject.
            await agent.serve(subjects.EXECUTOR_RUN, TaskSpec, plan, queue=subjects.EXECUTORS)
            await synced(agent.nc)
            reply = await orchestrator.request(subjects.EXECUTOR_RUN, TaskSpec(title="t", gates=["doctor"]),
                                               TaskAccepted)
            assert reply.task_id == "task-3"

            # The agent's durable publish is stored (JetStream ack without the JS API).
            await agent.publish(subjects.progress("task-3"), ProgressEvent(
                task_id="task-3", iteration=1, kind="item_started", item_id="a"))
            assert await client.last_event(subjects.progress("task-3")) is not None
            seen = [subject async for subject, _, _ in client.history(subjects.task_events("task-3"))]
            assert seen == [subjects.progress("task-3")]
        finally:
            await client.close()
            await agent.close()
            await orchestrator.close()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_the_credentials_files_are_readable_by_their_owner_only(server: EmbeddedNats) -> None:
    folder = server.state_dir / "auth"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for path in [*(folder / f"{role}.json" for role in ("client", "agent", "orchestrator")),
                 folder / "nats-server.conf"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert load_role(server.state_dir, "client") == server.credentials("client")
    assert json.loads((folder / "agent.json").read_text())["user"] == "agent"


def test_credentials_are_reused_and_replaced_when_others_could_read_them(tmp_path: Path) -> None:
    first = ensure_credentials(tmp_path)
    assert ensure_credentials(tmp_path) == first
    os.chmod(role_file(tmp_path, "agent"), 0o644)
    fresh = ensure_credentials(tmp_path)
    assert fresh["agent"].password != first["agent"].password
    assert stat.S_IMODE(role_file(tmp_path, "agent").stat().st_mode) == 0o600


def test_an_open_server_for_tests_needs_no_credentials(tmp_path: Path) -> None:
    async def scenario(url: str) -> None:
        bus = await Bus.connect(url, name="test")
        await bus.close()

    with EmbeddedNats(tmp_path, auth=False) as open_server:
        assert open_server.credentials("client") is None
        asyncio.run(asyncio.wait_for(scenario(open_server.url), 30))
    assert not (tmp_path / "auth").exists()


def test_nats_auth_travels_pickled_and_never_shows_its_secrets() -> None:
    auth = NatsAuth(user="agent", password="s3cret-pass", token=None)
    assert pickle.loads(pickle.dumps(auth)) == auth
    assert "s3cret-pass" not in repr(auth)
    assert auth.connect_options() == {"user": "agent", "password": "s3cret-pass"}
    assert NatsAuth(token="tok").connect_options() == {"token": "tok"}


def _tls_files(folder: Path) -> tuple[Path, Path, Path]:
    """A CA and a certificate for 127.0.0.1 that it signed: (ca.pem, server.pem, server.key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, signer: ec.EllipticCurvePrivateKey,
                    *extensions: tuple[x509.ExtensionType, bool]) -> x509.Certificate:
        builder = (x509.CertificateBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
                   .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hivebus test CA")]))
                   .public_key(key.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now).not_valid_after(now + datetime.timedelta(hours=1)))
        for extension, critical in extensions:
            builder = builder.add_extension(extension, critical=critical)
        return builder.sign(signer, hashes.SHA256())

    ca_key, server_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = certificate("hivebus test CA", ca_key, ca_key, (x509.BasicConstraints(ca=True, path_length=None), True))
    server = certificate("127.0.0.1", server_key, ca_key, (
        x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False))
    paths = folder / "ca.pem", folder / "server.pem", folder / "server.key"
    paths[0].write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    paths[1].write_bytes(server.public_bytes(serialization.Encoding.PEM))
    paths[2].write_bytes(server_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    return paths


@pytest.fixture
def tls_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An external nats-server that requires TLS and a token: (url, ca.pem)."""
    ca, cert, key = _tls_files(tmp_path)
    config = tmp_path / "tls.conf"
    config.write_text(f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
                      'authorization { token: "the-token" }\n')
    (tmp_path / "run").mkdir()
    process = subprocess.Popen([find_nats_server(), "-c", str(config), "-a", "127.0.0.1", "-p", "-1",
                                "--ports_file_dir", str(tmp_path / "run")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        ports = tmp_path / "run" / f"nats-server_{process.pid}.ports"
        deadline = time.monotonic() + 15
        while not ports.exists() or not ports.read_text().strip().endswith("}"):
            assert time.monotonic() < deadline and process.poll() is None, "nats-server did not start"
            time.sleep(0.02)
        yield json.loads(ports.read_text())["nats"][0], ca
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_an_external_server_with_tls_and_a_token(tls_server: tuple[str, Path]) -> None:
    url, ca = tls_server

    async def attempt(**options: str) -> str:
        try:
            bus = await Bus.connect(url, name="external", auth=auth_from_options(**options))
        except TransportError as exc:
            return str(exc)
        await bus.close()
        return "connected"

    async def scenario() -> list[str]:
        return [await attempt(token="the-token", tls_ca=str(ca)),
                await attempt(token="a-guess", tls_ca=str(ca)),
                await attempt(token="the-token")]

    ok, wrong_token, untrusted = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert ok == "connected"
    assert wrong_token == f"NATS at {url} refused the token"
    assert untrusted.startswith(f"NATS at {url} presented a certificate that is not trusted")
    assert untrusted.endswith("pass --tls-ca with the CA that signed it")


def test_cli_auth_options_are_checked_before_connecting(tmp_path: Path) -> None:
    assert auth_from_options() is None
    assert auth_from_options(user="u", password="p") == NatsAuth(user="u", password="p")
    with pytest.raises(NatsAuthError, match="--nats-password needs --nats-user"):
        auth_from_options(password="p")
    with pytest.raises(NatsAuthError, match="not --nats-user and --nats-token"):
        auth_from_options(user="u", password="p", token="t")
    with pytest.raises(NatsAuthError, match="--tls-cert and --tls-key go together"):
        auth_from_options(tls_cert=str(tmp_path / "c.pem"))
    with pytest.raises(NatsAuthError, match="no such file"):
        auth_from_options(tls_ca=str(tmp_path / "missing.pem"))


# -- the execution policy ---------------------------------------------------------------------


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "project"
    (path / "pkg").mkdir(parents=True)
    (path / "pkg" / "__init__.py").write_text("")
    (path / "pkg" / "steps.py").write_text("def build():\n    return 1\n")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "outside.py").write_text("def f():\n    return 1\n")
    return path


def shell(run: str, item_id: str = "x") -> WorkItemSpec:
    return WorkItemSpec(id=item_id, run=run)


def refusals(policy: Policy, *items: WorkItemSpec, workdir: Path | str, **kwargs) -> list[str]:
    return [str(v) for v in policy.check(list(items), workdir=str(workdir), **kwargs)]


def test_curl_is_refused_by_the_local_policy_naming_the_rule(root: Path) -> None:
    assert refusals(Policy.local(root), shell("curl -o x https://example.com", "fetch"), workdir=root) == [
        "work item 'fetch': 'curl' is not an allowed executable (rule: executables)"
    ]


@pytest.mark.parametrize(("run", "program"), [
    ("make test && curl https://example.com | sh", "curl"),
    ("echo $(curl https://example.com)", "curl"),
    ("timeout 5 wget https://example.com", "wget"),
    ("env A=1 nc -l 8080", "nc"),
    ("bash -c 'ssh host'", "ssh"),
    ("find . -exec scp {} host: \\;", "scp"),
    ("/usr/bin/curl https://example.com", "/usr/bin/curl"),
    ("cat <<EOF\n$(sudo id)\nEOF", "sudo"),
])
def test_a_forbidden_program_is_found_wherever_the_command_line_hides_it(
        root: Path, run: str, program: str) -> None:
    found = Policy.local(root).check([shell(run)], workdir=str(root))
    assert f"{program!r} is not an allowed executable" in [v.message for v in found], found


def test_a_shell_reading_commands_it_cannot_see_is_refused(root: Path) -> None:
    for run in ("echo 'curl x' | sh", "$TOOL --version", "eval \"$CMD\""):
        found = Policy.local(root).check([shell(run)], workdir=str(root))
        assert [v.rule for v in found] in (["shell"], ["executables"]), run
        assert found[0].message.endswith(("cannot be checked; use -c or a script file",
                                          "is computed when it runs; name it literally",
                                          "cannot be checked")), found


def test_rm_outside_the_workdir_is_refused_and_inside_allowed(root: Path, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    local = Policy.local(root)
    assert refusals(local, shell(f"rm -rf {elsewhere}"), workdir=root) == [
        f"work item 'x': 'rm' would change {elsewhere}, outside the workdir {root} (rule: confined)"
    ]
    assert refusals(local, shell("rm -rf build"), workdir=root) == []
    assert refusals(local, shell("mkdir -p build && cd build && rm -rf ./*"), workdir=root) == []
    for escape in ("rm -rf ../elsewhere", "cd .. && rm -rf elsewhere", "rm -rf ~/x",
                   'rm -rf "$HOME"', "echo x > ../elsewhere/file", "ls | xargs rm"):
        found = local.check([shell(escape)], workdir=str(root))
        assert [v.rule for v in found] == ["confined"], escape


def test_an_item_may_write_its_handoff_notes_but_not_redirect_elsewhere(root: Path) -> None:
    local = Policy.local(root)
    assert local.check([shell('echo "next: lint" > "$HIVEBUS_HANDOFF"')], workdir=str(root)) == []
    for run in ('echo x > "$OUT"', "echo x >> /etc/profile", 'HIVEBUS_HANDOFF=/etc/x; echo > "$HIVEBUS_HANDOFF"'):
        assert local.check([shell(run)], workdir=str(root)) != [], run


def test_a_workdir_that_climbs_out_of_the_root_is_refused(root: Path) -> None:
    found = Policy.local(root).check([shell("echo hi")], workdir="../../etc", base=str(root))
    assert [(v.kind, v.rule) for v in found] == [("task", "workdirs")]
    assert "is outside the allowed directories" in str(found[0])
    assert Policy.local(root).check([shell("echo hi")], workdir="pkg", base=str(root)) == []


def test_a_symlink_inside_the_root_that_points_outside_is_refused(root: Path, tmp_path: Path) -> None:
    (root / "link").symlink_to(tmp_path / "elsewhere")
    local = Policy.local(root)
    found = local.check([shell("echo hi")], workdir=str(root / "link"))
    assert [v.rule for v in found] == ["workdirs"]
    assert f"resolves to {tmp_path / 'elsewhere'}" in str(found[0])
    # Deleting through the link (trailing slash) is refused; removing the link itself is not.
    assert [v.rule for v in local.check([shell("rm -rf link/")], workdir=str(root))] == ["confined"]
    assert local.check([shell("rm link")], workdir=str(root)) == []


def test_deny_all_refuses_every_kind_of_work(root: Path) -> None:
    items = [shell("echo hi", "a"), WorkItemSpec(id="b", call="pkg.steps:build"),
             WorkItemSpec(id="c", prompt="say hi")]
    found = Policy.deny_all().check(items, workdir=str(root), gates=[GateSpec(name="tests", run="true")])
    assert {(v.kind, v.item_id or None, v.rule) for v in found} == {
        ("task", None, "workdirs"), ("work item", "a", "executables"),
        ("work item", "b", "callables"), ("work item", "c", "prompts"),
        ("gate", "tests", "executables"),
    }


def test_call_items_may_import_only_modules_of_their_workdir_under_local(root: Path, tmp_path: Path) -> None:
    local = Policy.local(root)
    assert local.check([WorkItemSpec(id="ok", call="pkg.steps:build")], workdir=str(root)) == []
    for target in ("outside:f", "os:system", "subprocess:run", "json.tool:main"):
        found = local.check([WorkItemSpec(id="c", call=target)], workdir=str(root))
        assert [v.rule for v in found] == ["callables"], target
    (root / "escape").symlink_to(tmp_path)  # a package folder that leaves the workdir
    found = local.check([WorkItemSpec(id="c", call="escape.outside:f")], workdir=str(root))
    assert [v.rule for v in found] == ["callables"]
    assert "outside the workdir" in found[0].message


def test_environment_variables_pass_only_when_allowed(root: Path) -> None:
    policy = Policy(executables=["echo"], workdirs=[str(root)], env=["CI", "PYTEST_*"])
    item = WorkItemSpec(id="t", run="echo", env={"PYTEST_ADDOPTS": "-q", "AWS_SECRET_ACCESS_KEY": "x"})
    assert refusals(policy, item, workdir=root, env={"CI": "1"}) == [
        "work item 't': environment variable 'AWS_SECRET_ACCESS_KEY' is not allowed to pass (rule: env)"
    ]
    # Even "env: all" does not let a task choose which programs its names resolve to.
    found = Policy.local(root).check([WorkItemSpec(id="p", run="git status", env={"PATH": "/tmp"})],
                                     workdir=str(root))
    assert [v.rule for v in found] == ["env"]


def test_a_command_line_may_not_change_which_program_a_name_runs(root: Path) -> None:
    for run in ("PATH=/tmp/evil:$PATH git status", "export LD_PRELOAD=/tmp/x.so; make",
                "env PATH=/tmp/evil git status", "read PATH; git status"):
        found = Policy.local(root).check([shell(run)], workdir=str(root))
        assert [v.rule for v in found] == ["env"], run


def test_command_substitution_needs_sh_in_the_policy(root: Path) -> None:
    strict = Policy(executables=["echo", "date"], workdirs=[str(root)])
    assert [v.rule for v in strict.check([shell("echo $(date)")], workdir=str(root))] == ["shell"]
    with_sh = Policy(executables=["echo", "date", "sh"], workdirs=[str(root)])
    assert with_sh.check([shell("echo $(date)")], workdir=str(root)) == []


def test_a_policy_file_allows_arguments_by_pattern(root: Path, tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(
        "executables:\n"
        "  - echo\n"
        "  - name: git\n"
        "    args: ['status', 'diff( .*)?']\n"
        "workdirs: [project]\n"
        "env: [CI]\n"
    )
    policy = Policy.load(path)
    assert policy.name == "policy" and policy.workdirs == [str(root)]
    assert policy.check([shell("git status && git diff --stat")], workdir=str(root)) == []
    found = policy.check([shell("git push origin main")], workdir=str(root))
    assert [v.rule for v in found] == ["args"]
    assert str(found[0]) == ("work item 'x': the arguments of 'git' ('push origin main') match none "
                             "of its allowed patterns (rule: args)")


def test_a_bad_policy_file_names_the_field(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("executables:\n  - name: git\n    args: ['(']\nshells: [sh]\n")
    with pytest.raises(PolicyFileError) as caught:
        Policy.load(path)
    text = str(caught.value)
    assert str(path) in text and "executables.0.args" in text and "shells" in text


def test_a_violation_reads_as_a_sentence() -> None:
    violation = Violation(item_id="fetch", rule="executables", message="'curl' is not an allowed executable")
    assert str(violation) == "work item 'fetch': 'curl' is not an allowed executable (rule: executables)"


# -- secrets ----------------------------------------------------------------------------------


@pytest.fixture
def key() -> bytes:
    return os.urandom(32)


def test_a_secret_round_trips_and_is_not_stored_in_plaintext(tmp_path: Path, key: bytes) -> None:
    store = SecretStore(tmp_path / "secrets.enc", key)
    store.set("API_TOKEN", "tok-0123456789abcdef")
    store.set("DB_PASSWORD", "correct horse battery")
    assert SecretStore(tmp_path / "secrets.enc", key).get("API_TOKEN") == "tok-0123456789abcdef"
    assert store.names() == ["API_TOKEN", "DB_PASSWORD"]
    raw = (tmp_path / "secrets.enc").read_bytes()
    assert b"tok-0123456789abcdef" not in raw and b"correct horse" not in raw
    assert stat.S_IMODE((tmp_path / "secrets.enc").stat().st_mode) == 0o600
    assert store.delete("DB_PASSWORD") and store.names() == ["API_TOKEN"]
    with pytest.raises(UnknownSecret, match="'DB_PASSWORD' is not in the secret store"):
        store.get("DB_PASSWORD")


def test_a_wrong_key_is_refused_with_a_sentence(tmp_path: Path, key: bytes) -> None:
    SecretStore(tmp_path / "secrets.enc", key).set("A", "value-a")
    with pytest.raises(SecretError, match="is not the key its secrets were stored with"):
        SecretStore(tmp_path / "secrets.enc", os.urandom(32), key_source="$HIVEBUS_SECRET_KEY")


def test_swapping_two_ciphertexts_in_the_file_is_detected(tmp_path: Path, key: bytes) -> None:
    store = SecretStore(tmp_path / "secrets.enc", key)
    store.set("A", "value-a")
    store.set("B", "value-b")
    data = json.loads((tmp_path / "secrets.enc").read_text())
    data["secrets"]["A"], data["secrets"]["B"] = data["secrets"]["B"], data["secrets"]["A"]
    (tmp_path / "secrets.enc").write_text(json.dumps(data))
    with pytest.raises(SecretError, match="altered or stored under another name"):
        store.get("A")


def test_the_key_file_lives_outside_the_state_dir(tmp_path: Path) -> None:
    state = tmp_path / "state"
    with pytest.raises(SecretError, match="is inside the state dir"):
        load_key(state_dir=state, key_file=state / "secret.key", environ={})
    key, source = load_key(state_dir=state, key_file=tmp_path / "keys" / "secret.key", environ={})
    assert len(key) == 32 and source == str(tmp_path / "keys" / "secret.key")
    assert stat.S_IMODE((tmp_path / "keys" / "secret.key").stat().st_mode) == 0o600
    assert load_key(state_dir=state, key_file=tmp_path / "keys" / "secret.key", environ={})[0] == key
    os.chmod(tmp_path / "keys" / "secret.key", 0o644)
    with pytest.raises(SecretError, match="can be read by other users"):
        load_key(state_dir=state, key_file=tmp_path / "keys" / "secret.key", environ={})


def test_the_key_may_come_from_the_environment(tmp_path: Path, key: bytes) -> None:
    environ = {KEY_ENV: base64.b64encode(key).decode()}
    store = SecretStore.open(tmp_path / "state", key_file=tmp_path / "state" / "ignored", environ=environ)
    store.set("A", "value-a")
    assert SecretStore(tmp_path / "state" / "secrets.enc", key).get("A") == "value-a"
    with pytest.raises(SecretError, match="AES-256 needs 32"):
        load_key(environ={KEY_ENV: base64.b64encode(b"short").decode()})


def test_references_resolve_into_the_env_and_their_values_are_redacted(tmp_path: Path, key: bytes) -> None:
    store = SecretStore(tmp_path / "secrets.enc", key)
    store.set("API_TOKEN", "tok-0123456789abcdef")
    env, used = resolve_env({"AUTH": "Bearer ${secret:API_TOKEN}", "MODE": "ci"}, store)
    assert env == {"AUTH": "Bearer tok-0123456789abcdef", "MODE": "ci"}
    assert used == ["tok-0123456789abcdef"]
    assert redact("got tok-0123456789abcdef twice: tok-0123456789abcdef", used) == "got *** twice: ***"
    # A tail that starts in the middle of the secret, and a head that ends in it.
    assert redact("456789abcdef\nexit 0", used) == "***\nexit 0"
    assert redact("token: tok-0123", used) == "token: ***"
    assert redact_value({"out": ["tok-0123456789abcdef"], "n": 1}, used) == {"out": ["***"], "n": 1}
    with pytest.raises(UnknownSecret) as caught:
        resolve_env({"X": "${secret:MISSING}"}, store)
    assert caught.value.name == "MISSING"
    with pytest.raises(SecretError, match="no secret store"):
        resolve_env({"X": "${secret:API_TOKEN}"}, None)

"""NATS credentials: what a process presents to the server, and the embedded server's users.

The embedded nats-server has three users, one per role (``client``, ``agent``,
``orchestrator``), with the subject permissions of ``nats-server.conf.template``. Their
random passwords live in ``<state dir>/auth/<role>.json`` (mode 0600, folder 0700), where
CLI clients started later in the same state dir find them with ``load_role``.
"""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import re
import secrets
import ssl
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import structlog
from nats.errors import (
    AuthorizationError,
    SecureConnFailedError,
    SecureConnRequiredError,
    SecureConnWantedError,
)

from schemas import HivebusError

log = structlog.get_logger("hivebus.auth")

ROLES = ("client", "agent", "orchestrator")
AUTH_DIR = "auth"
TEMPLATE = "nats-server.conf.template"
SERVER_CONFIG = "nats-server.conf"


class NatsAuthError(HivebusError):
    """Credentials or TLS options that cannot be used (missing file, half a pair, bad PEM)."""


@dataclass(frozen=True)
class NatsAuth:
    """What a process presents to NATS: a user and password, a token, a ``.creds`` file
    (JWT + nkey seed) and/or TLS files. Picklable, so it can travel in actor settings;
    the password and token are left out of ``repr`` so that logs do not show them."""

    user: str | None = None
    password: str | None = field(default=None, repr=False)
    token: str | None = field(default=None, repr=False)
    creds_file: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    def connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect``."""
        options: dict[str, Any] = {}
        if self.user is not None:
            options["user"] = self.user
            options["password"] = self.password or ""
        if self.token is not None:
            options["token"] = self.token
        if self.creds_file is not None:
            try:
                import nkeys  # noqa: F401  (nats-py signs the server's nonce with it)
            except ImportError:
                raise NatsAuthError(
                    "a NATS credentials file needs the nkeys package: pip install 'nats-py[nkeys]'"
                ) from None
            if not os.path.isfile(self.creds_file):
                raise NatsAuthError(f"the NATS credentials file {self.creds_file} does not exist")
            options["user_credentials"] = self.creds_file
        if self.tls_ca or self.tls_cert:
            options["tls"] = self.ssl_context()
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context that trusts ``tls_ca`` (or the system's CAs) and presents
        ``tls_cert``/``tls_key`` when given."""
        try:
            context = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                context.load_cert_chain(self.tls_cert, self.tls_key)
        except FileNotFoundError as exc:
            raise NatsAuthError(f"TLS file {exc.filename} does not exist") from None
        except (ssl.SSLError, OSError) as exc:
            files = ", ".join(f for f in (self.tls_ca, self.tls_cert, self.tls_key) if f)
            raise NatsAuthError(f"cannot use the TLS files {files}: {exc}") from None
        return context

    def describe(self) -> str:
        """Whose credentials these are, for an error sentence (never the secret itself)."""
        if self.user is not None:
            return f"the credentials of user {self.user!r}"
        if self.creds_file is not None:
            return f"the credentials file {self.creds_file}"
        if self.token is not None:
            return "the token"
        return "the TLS client certificate" if self.tls_cert else "no credentials"

    @property
    def has_credentials(self) -> bool:
        return any(v is not None for v in (self.user, self.token, self.creds_file, self.tls_cert))


def auth_from_options(*, creds: str | None = None, user: str | None = None,
                      password: str | None = None, token: str | None = None,
                      tls_ca: str | None = None, tls_cert: str | None = None,
                      tls_key: str | None = None) -> NatsAuth | None:
    """The NatsAuth of the CLI options ``--nats-creds``, ``--nats-user/--nats-password``,
    ``--nats-token``, ``--tls-ca/--tls-cert/--tls-key``; None when none is given."""
    if not any((creds, user, password, token, tls_ca, tls_cert, tls_key)):
        return None
    if password is not None and user is None:
        raise NatsAuthError("--nats-password needs --nats-user")
    if user is not None and password is None:
        raise NatsAuthError("--nats-user needs --nats-password")
    given = [name for name, value in (("--nats-creds", creds), ("--nats-user", user),
                                      ("--nats-token", token)) if value]
    if len(given) > 1:
        raise NatsAuthError("give one of --nats-creds, --nats-user or --nats-token, "
                            f"not {' and '.join(given)}")
    if bool(tls_cert) != bool(tls_key):
        raise NatsAuthError("--tls-cert and --tls-key go together")
    for option, path in (("--nats-creds", creds), ("--tls-ca", tls_ca), ("--tls-cert", tls_cert),
                         ("--tls-key", tls_key)):
        if path and not os.path.isfile(path):
            raise NatsAuthError(f"{option} {path}: no such file")
    return NatsAuth(user=user, password=password, token=token, creds_file=_absolute(creds),
                    tls_ca=_absolute(tls_ca), tls_cert=_absolute(tls_cert), tls_key=_absolute(tls_key))


def _absolute(path: str | None) -> str | None:
    # Absolute, so that an actor or a later chdir reads the same file.
    return os.path.abspath(path) if path else None


# -- a refused connect ---------------------------------------------------------------------

class ConnectRefused(Exception):
    """Raised from nats-py's error callback to end a first connect the server refused
    (nats-py would otherwise retry it forever); ``Bus.connect`` turns it into a sentence."""

    def __init__(self, error: Exception):
        super().__init__(str(error))
        self.error = error


def is_refusal(exc: Exception) -> bool:
    """Whether a connect error is a refusal that retrying cannot cure (credentials, TLS)."""
    if isinstance(exc, (AuthorizationError, SecureConnRequiredError, SecureConnWantedError,
                        SecureConnFailedError, ssl.SSLError)):
        return True
    text = str(exc).lower()
    return "authorization violation" in text or "authentication" in text


def refusal_sentence(url: str, auth: NatsAuth | None, exc: Exception) -> str:
    """What a user reads when the server at ``url`` refused ``auth``."""
    if isinstance(exc, SecureConnRequiredError):
        return (f"NATS at {url} requires TLS; pass --tls-ca (and --tls-cert/--tls-key "
                "if it asks for a client certificate)")
    if isinstance(exc, SecureConnWantedError):
        return f"NATS at {url} does not offer TLS, but TLS options were given"
    if isinstance(exc, ssl.SSLCertVerificationError):
        return (f"NATS at {url} presented a certificate that is not trusted ({exc.verify_message}); "
                "pass --tls-ca with the CA that signed it")
    if isinstance(exc, (ssl.SSLError, SecureConnFailedError)):
        return f"the TLS handshake with NATS at {url} failed: {exc}"
    if auth is None or not auth.has_credentials:
        return (f"NATS at {url} requires credentials: pass --nats-creds, "
                "--nats-user/--nats-password or --nats-token (an embedded server's are in "
                "<state dir>/auth/)")
    return f"NATS at {url} refused {auth.describe()}"


def public_url(url: str) -> str:
    """``url`` without the user and password it may carry, for messages and logs."""
    scheme, sep, rest = url.rpartition("://")
    return f"{scheme}{sep}{rest.rsplit('@', 1)[-1]}"


# -- the embedded server's credentials ------------------------------------------------------

def auth_dir(state_dir: str | Path) -> Path:
    return Path(state_dir) / AUTH_DIR


def role_file(state_dir: str | Path, role: str) -> Path:
    if role not in ROLES:
        raise ValueError(f"unknown NATS role {role!r}; one of {', '.join(ROLES)}")
    return auth_dir(state_dir) / f"{role}.json"


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` with mode 0600, atomically (no moment with wider rights)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)  # O_CREAT's mode is filtered by the umask; this is not
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def _private_dir(path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(path, 0o700)


def save_role(state_dir: str | Path, role: str, auth: NatsAuth) -> Path:
    """Store a role's credentials in ``<state_dir>/auth/<role>.json`` (0600)."""
    path = role_file(state_dir, role)
    _private_dir(path.parent)
    fields = {k: v for k, v in dataclasses.asdict(auth).items() if v is not None}
    _write_private(path, json.dumps({"role": role, **fields}, indent=2) + "\n")
    return path


def load_role(state_dir: str | Path, role: str) -> NatsAuth | None:
    """A role's stored credentials, or None when the state dir has none (an open server)."""
    path = role_file(state_dir, role)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as exc:
        raise NatsAuthError(f"cannot read the NATS credentials in {path}: {exc}") from None
    known = {f.name for f in dataclasses.fields(NatsAuth)}
    if not isinstance(data, dict) or not data.get("user"):
        raise NatsAuthError(f"{path} holds no NATS credentials (no 'user')")
    return NatsAuth(**{k: v for k, v in data.items() if k in known})


def _loose(path: Path) -> bool:
    return bool(path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO))


def ensure_credentials(state_dir: str | Path) -> dict[str, NatsAuth]:
    """The three roles' credentials: reused from ``<state_dir>/auth`` or generated there.

    Files whose mode lets others read them are treated as leaked and replaced by new
    passwords. Two hives starting in one state dir agree through a file lock.
    """
    folder = auth_dir(state_dir)
    _private_dir(folder)
    lock = os.open(folder / ".lock", os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        found: dict[str, NatsAuth] = {}
        for role in ROLES:
            path = role_file(state_dir, role)
            if not path.exists():
                break
            if _loose(path):
                log.warning("NATS credentials readable by others; generating new ones", file=str(path))
                break
            auth = load_role(state_dir, role)
            if auth is None or auth.user != role or not auth.password:
                break
            found[role] = auth
        if len(found) == len(ROLES):
            return found
        fresh = {role: NatsAuth(user=role, password=secrets.token_urlsafe(32)) for role in ROLES}
        for role, auth in fresh.items():
            save_role(state_dir, role, auth)
        return fresh
    finally:
        os.close(lock)


def server_template() -> str:
    """The NATS server configuration template shipped in the ``bus`` package."""
    return resources.files(__package__).joinpath(TEMPLATE).read_text(encoding="utf-8")


def render_server_config(credentials: Mapping[str, NatsAuth]) -> str:
    """The template with each role's password filled in."""
    text = server_template()
    for role in ROLES:
        password = credentials[role].password or ""
        if not password or not all(c.isalnum() or c in "-_" for c in password):
            # token_urlsafe passwords need no quoting; anything else could break the file.
            raise NatsAuthError(f"the password of NATS role {role!r} must be URL-safe base64")
        text = text.replace("{{" + role + "_password}}", password)
    left = re.findall(r"\{\{\w+\}\}", text)
    if left:
        raise NatsAuthError(f"{TEMPLATE} has placeholders hivebus does not fill: {', '.join(left)}")
    return text


def write_server_config(state_dir: str | Path, credentials: Mapping[str, NatsAuth]) -> Path:
    """Render the server configuration into ``<state_dir>/auth/nats-server.conf`` (0600)."""
    path = auth_dir(state_dir) / SERVER_CONFIG
    _private_dir(path.parent)
    _write_private(path, render_server_config(credentials))
    return path


__all__ = [
    "ConnectRefused", "NatsAuth", "NatsAuthError", "ROLES", "auth_dir", "auth_from_options",
    "ensure_credentials", "is_refusal", "public_url", "refusal_sentence",
    "load_role", "render_server_config", "role_file", "save_role", "server_template",
    "write_server_config",
]

"""Secrets: stored encrypted, given only to a work item's environment, redacted elsewhere.

A task's ``env`` may reference ``${secret:NAME}``. The values live in
``<state dir>/secrets.enc`` (mode 0600), each encrypted with AES-256-GCM under a random
96-bit nonce and bound to its name. The 32-byte key comes from ``$HIVEBUS_SECRET_KEY``
(base64) or from a key file outside the state dir (default
``~/.config/hivebus/secret.key``, created with mode 0600 when missing), so that a copy
of the state dir does not carry the key to its own secrets.

The executor resolves references right before it starts the child (``resolve_env``) and
passes every output it reports through ``redact``; nothing else ever sees the values.
"""

from __future__ import annotations

import base64
import binascii
import fcntl
import json
import os
import re
import stat
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from schemas import HivebusError

KEY_ENV = "HIVEBUS_SECRET_KEY"
STORE_FILE = "secrets.enc"
#: Values shorter than this are not redacted: replacing every "ab" in a log hides nothing.
MIN_REDACT = 4
REDACTED = "***"

SECRET_NAME = r"[A-Za-z_][A-Za-z0-9_.-]{0,127}"
SECRET_REF = re.compile(r"\$\{secret:(" + SECRET_NAME + r")\}")

_FORMAT = "hivebus-secrets"
_NONCE_BYTES = 12
_KEY_CHECK = b"hivebus-key-check"


class SecretError(HivebusError):
    """A secret that cannot be stored, found or decrypted; ``str()`` says which and why."""


class UnknownSecret(SecretError):
    """A ``${secret:NAME}`` reference to a secret the store does not hold."""

    def __init__(self, name: str, where: str):
        self.name = name
        super().__init__(f"secret {name!r} is not in the secret store {where}")


def default_key_file() -> Path:
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return Path(config) / "hivebus" / "secret.key"


def _decode_key(text: str, source: str) -> bytes:
    cleaned = "".join(text.split()).replace("-", "+").replace("_", "/")
    try:
        key = base64.b64decode(cleaned + "=" * (-len(cleaned) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise SecretError(f"the secret key in {source} is not base64") from None
    if len(key) != 32:
        raise SecretError(f"the secret key in {source} has {len(key)} bytes; AES-256 needs 32")
    return key


def _inside(path: Path, root: Path) -> bool:
    path, root = path.resolve(), root.resolve()
    return path == root or root in path.parents


def load_key(*, state_dir: str | Path | None = None, key_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None, create: bool = True) -> tuple[bytes, str]:
    """The secret key and where it came from: ``$HIVEBUS_SECRET_KEY``, else ``key_file``
    (default ``default_key_file()``), created when missing and ``create``.

    A key file inside ``state_dir`` or readable by other users is refused.
    """
    environ = os.environ if environ is None else environ
    if environ.get(KEY_ENV):
        return _decode_key(environ[KEY_ENV], f"${KEY_ENV}"), f"${KEY_ENV}"
    path = Path(key_file).expanduser() if key_file else default_key_file()
    if state_dir is not None and _inside(path, Path(state_dir)):
        raise SecretError(
            f"the secret key file {path} is inside the state dir {state_dir}; keep it outside "
            f"(default {default_key_file()}) or set ${KEY_ENV}, so that a copy of the state "
            "dir does not carry the key to its secrets"
        )
    if not path.exists():
        if not create:
            raise SecretError(f"there is no secret key file {path} and ${KEY_ENV} is not set")
        return _create_key(path), str(path)
    mode = path.stat().st_mode
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise SecretError(f"the secret key file {path} can be read by other users "
                          f"(mode {stat.S_IMODE(mode):04o}); run: chmod 600 {path}")
    try:
        return _decode_key(path.read_text(encoding="ascii"), str(path)), str(path)
    except (OSError, UnicodeDecodeError) as exc:
        raise SecretError(f"cannot read the secret key file {path}: {exc}") from None


def _create_key(path: Path) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key = AESGCM.generate_key(bit_length=256)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first: use theirs
        return _decode_key(path.read_text(encoding="ascii"), str(path))
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, base64.b64encode(key) + b"\n")
    finally:
        os.close(fd)
    return key


class SecretStore:
    """Name → value, encrypted at rest with AES-256-GCM in one JSON file (mode 0600)."""

    def __init__(self, path: str | Path, key: bytes, *, key_source: str = "the given key"):
        if len(key) != 32:
            raise SecretError(f"the secret key has {len(key)} bytes; AES-256 needs 32")
        self.path = Path(path)
        self.key_source = key_source
        self._aead = AESGCM(key)
        self._read()  # a wrong key is refused now, not at the first get()

    @classmethod
    def open(cls, state_dir: str | Path, *, key_file: str | Path | None = None,
             environ: Mapping[str, str] | None = None) -> SecretStore:
        """The store ``<state_dir>/secrets.enc`` with the key of ``load_key``."""
        key, source = load_key(state_dir=state_dir, key_file=key_file, environ=environ)
        return cls(Path(state_dir) / STORE_FILE, key, key_source=source)

    # -- the file ---------------------------------------------------------------------

    def _read(self) -> dict[str, str]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise SecretError(f"cannot read the secret store {self.path}: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != _FORMAT:
            raise SecretError(f"{self.path} is not a hivebus secret store")
        try:
            check = self._decrypt(data["check"], _KEY_CHECK)
        except (InvalidTag, KeyError, ValueError):
            check = None
        if check != _KEY_CHECK:
            raise SecretError(f"cannot open the secret store {self.path}: the key from "
                              f"{self.key_source} is not the key its secrets were stored with")
        secrets = data.get("secrets", {})
        if not isinstance(secrets, dict):
            raise SecretError(f"{self.path} is not a hivebus secret store")
        return secrets

    def _write(self, secrets: Mapping[str, str]) -> None:
        data = {"format": _FORMAT, "version": 1, "cipher": "AES-256-GCM",
                "check": self._encrypt(_KEY_CHECK, _KEY_CHECK), "secrets": dict(sorted(secrets.items()))}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            os.write(fd, (json.dumps(data, indent=2) + "\n").encode())
        finally:
            os.close(fd)
        os.replace(tmp, self.path)

    def _locked(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path.with_name(f".{self.path.name}.lock"), os.O_CREAT | os.O_RDWR, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd

    def _encrypt(self, plaintext: bytes, aad: bytes) -> str:
        nonce = os.urandom(_NONCE_BYTES)
        return base64.b64encode(nonce + self._aead.encrypt(nonce, plaintext, aad)).decode()

    def _decrypt(self, blob: str, aad: bytes) -> bytes:
        raw = base64.b64decode(blob, validate=True)
        return self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], aad)

    # -- the mapping ------------------------------------------------------------------

    def set(self, name: str, value: str) -> None:
        if not re.fullmatch(SECRET_NAME, name):
            raise SecretError(f"{name!r} is not a secret name: letters, digits, _ . - "
                              "(first a letter or _), at most 128")
        lock = self._locked()
        try:
            secrets = self._read()
            secrets[name] = self._encrypt(value.encode(), _aad(name))
            self._write(secrets)
        finally:
            os.close(lock)

    def get(self, name: str) -> str:
        """The value of ``name``; UnknownSecret when the store does not hold it."""
        blob = self._read().get(name)
        if blob is None:
            raise UnknownSecret(name, str(self.path))
        try:
            return self._decrypt(blob, _aad(name)).decode()
        except (InvalidTag, ValueError, binascii.Error):
            raise SecretError(f"secret {name!r} in {self.path} cannot be decrypted: it was "
                              "altered or stored under another name") from None

    def names(self) -> list[str]:
        return sorted(self._read())

    def delete(self, name: str) -> bool:
        """Remove ``name``; False when it was not there."""
        lock = self._locked()
        try:
            secrets = self._read()
            if secrets.pop(name, None) is None:
                return False
            self._write(secrets)
            return True
        finally:
            os.close(lock)

    def __contains__(self, name: object) -> bool:
        return name in self._read()


def _aad(name: str) -> bytes:
    # Binds a ciphertext to its name: swapping two entries in the file is detected.
    return f"hivebus-secret:{name}".encode()


# -- references, resolution and redaction ----------------------------------------------------

def secret_names(values: Iterable[str] | Mapping[str, str]) -> list[str]:
    """The secret names referenced in ``values`` (a mapping's values), in order, once each."""
    texts = values.values() if isinstance(values, Mapping) else values
    found: dict[str, None] = {}
    for text in texts:
        for name in SECRET_REF.findall(text):
            found[name] = None
    return list(found)


def resolve_env(env: Mapping[str, str], store: SecretStore | None) -> tuple[dict[str, str], list[str]]:
    """``env`` with each ``${secret:NAME}`` replaced by its value, and the values used
    (for ``redact``). UnknownSecret names a secret the store does not hold."""
    used: dict[str, None] = {}
    resolved: dict[str, str] = {}
    names = secret_names(env)
    if names and store is None:
        raise SecretError(f"the task references the secret {names[0]!r}, but this hive has no "
                          "secret store")
    values = {name: store.get(name) for name in names} if store is not None else {}

    def value_of(match: re.Match[str]) -> str:
        value = values[match.group(1)]
        used[value] = None
        return value

    for key, text in env.items():
        resolved[key] = SECRET_REF.sub(value_of, text)
    return resolved, list(used)


def redact(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every occurrence of each secret value (of at least MIN_REDACT
    characters) replaced by ``***``, including a value cut by the start or the end of
    ``text`` (an output tail or head) where at least MIN_REDACT of its characters remain."""
    values = sorted({s for s in secrets if len(s) >= MIN_REDACT}, key=len, reverse=True)
    if not text or not values:
        return text
    text = re.sub("|".join(re.escape(v) for v in values), REDACTED, text)
    for value in values:
        for size in range(len(value) - 1, MIN_REDACT - 1, -1):
            if text.startswith(value[-size:]):
                text = REDACTED + text[size:]
                break
        for size in range(len(value) - 1, MIN_REDACT - 1, -1):
            if text.endswith(value[:size]):
                text = text[:-size] + REDACTED
                break
    return text


def redact_value(value: Any, secrets: Iterable[str]) -> Any:
    """``redact`` applied to every string inside a JSON-like value (a call item's output)."""
    secrets = list(secrets)
    if not secrets:
        return value
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, Mapping):
        return {redact_value(k, secrets): redact_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_value(v, secrets) for v in value]
    return value


__all__ = [
    "KEY_ENV", "MIN_REDACT", "REDACTED", "SECRET_REF", "STORE_FILE", "SecretError", "SecretStore",
    "UnknownSecret", "default_key_file", "load_key", "redact", "redact_value", "resolve_env",
    "secret_names",
]

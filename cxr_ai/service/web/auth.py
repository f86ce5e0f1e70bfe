"""Local users (salted argon2id hashes via ``argon2-cffi``), sign-in lock-out, and the
reader pseudonym that feedback records carry.

The users file is TOML written by ``cxr-ai users`` (mode 0600)::

    [[users]]
    name = "drwho"
    role = "radiologist"        # or "admin"
    hash = "$argon2id$v=19$..."
    disabled = false
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import stat
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from cxr_ai.errors import ConfigError

ROLES = ("radiologist", "admin")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$")
MIN_PASSWORD = 10

MSG_BAD_NAME = "user name {name!r} is not allowed: 1-64 letters, digits, '.', '_', '@' or '-', starting with a letter or digit"
MSG_BAD_ROLE = "role {role!r} is not one of {roles}"
MSG_SHORT_PASSWORD = "the password is too short: give at least {n} characters"
MSG_EXISTS = "user {name!r} already exists in {path}; use `cxr-ai users set-password` to change the password"
MSG_UNKNOWN = "no user {name!r} in {path}; `cxr-ai users list` shows who is there"
MSG_BAD_FILE = "users file {path} is not valid: {detail}; fix it or rebuild it with `cxr-ai users add`"

_hasher = PasswordHasher()


@dataclass(frozen=True)
class User:
    name: str
    role: str
    hash: str = ""
    disabled: bool = False

    @property
    def can_give_feedback(self) -> bool:
        return self.role == "radiologist" and not self.disabled


def _toml_string(value: str) -> str:
    import json

    return json.dumps(value)  # a JSON string is a valid TOML basic string


class UserStore:
    """The users file: parsed again whenever it changed on disk (so `cxr-ai users` changes
    apply at once), not on every look-up of a request."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._parsed: tuple[tuple[int, int, int], list[User]] | None = None

    def users(self) -> list[User]:
        try:
            st = self.path.stat()
        except FileNotFoundError:
            return []
        if not stat.S_ISREG(st.st_mode):
            return []
        key = (st.st_ino, st.st_mtime_ns, st.st_size)  # a rewrite replaces the file: a new inode
        parsed = self._parsed
        if parsed is None or parsed[0] != key:
            parsed = self._parsed = (key, self._read())
        return list(parsed[1])

    def _read(self) -> list[User]:
        try:
            data = tomllib.loads(self.path.read_text(encoding="utf-8"))
            out = [User(name=str(u["name"]), role=str(u["role"]), hash=str(u["hash"]),
                        disabled=bool(u.get("disabled", False))) for u in data.get("users", [])]
        except (tomllib.TOMLDecodeError, KeyError, TypeError) as exc:
            raise ConfigError(MSG_BAD_FILE.format(path=self.path, detail=f"{type(exc).__name__}: {exc}")) from exc
        for u in out:
            if u.role not in ROLES:
                raise ConfigError(MSG_BAD_FILE.format(path=self.path, detail=MSG_BAD_ROLE.format(role=u.role, roles=ROLES)))
        return out

    def any_users(self) -> bool:
        return bool(self.users())

    def get(self, name: str) -> User | None:
        return next((u for u in self.users() if u.name == name), None)

    def _write(self, users: list[User]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = ["# cxr-ai web users; managed with `cxr-ai users` (argon2id hashes)", ""]
        for u in users:
            lines += ["[[users]]", f"name = {_toml_string(u.name)}", f"role = {_toml_string(u.role)}",
                      f"hash = {_toml_string(u.hash)}", f"disabled = {'true' if u.disabled else 'false'}", ""]
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write("\n".join(lines))
        os.replace(tmp, self.path)

    @staticmethod
    def _check(name: str, role: str | None, password: str | None) -> None:
        if not NAME_RE.match(name):
            raise ConfigError(MSG_BAD_NAME.format(name=name))
        if role is not None and role not in ROLES:
            raise ConfigError(MSG_BAD_ROLE.format(role=role, roles=ROLES))
        if password is not None and len(password) < MIN_PASSWORD:
            raise ConfigError(MSG_SHORT_PASSWORD.format(n=MIN_PASSWORD))

    def add(self, name: str, *, password: str, role: str = "radiologist") -> User:
        self._check(name, role, password)
        with self._lock:
            users = self.users()
            if any(u.name == name for u in users):
                raise ConfigError(MSG_EXISTS.format(name=name, path=self.path))
            user = User(name=name, role=role, hash=_hasher.hash(password))
            self._write(users + [user])
        return user

    def _replace(self, name: str, **change: object) -> User:
        with self._lock:
            users = self.users()
            for i, u in enumerate(users):
                if u.name == name:
                    users[i] = User(**{**u.__dict__, **change})
                    self._write(users)
                    return users[i]
        raise ConfigError(MSG_UNKNOWN.format(name=name, path=self.path))

    def set_password(self, name: str, *, password: str) -> User:
        self._check(name, None, password)
        return self._replace(name, hash=_hasher.hash(password))

    def set_disabled(self, name: str, *, disabled: bool = True) -> User:
        return self._replace(name, disabled=disabled)

    def verify(self, name: str, password: str) -> User | None:
        """The user if the name and password match an enabled user; None otherwise.

        An unknown name costs a hash too, so timing does not tell which names exist.
        """
        user = self.get(name)
        try:
            if user is None:
                _hasher.verify(_DUMMY_HASH, password)
                return None
            _hasher.verify(user.hash, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        return None if user.disabled else user


_DUMMY_HASH = _hasher.hash("not a password of anyone")


class Lockout:
    """Failed sign-ins per user name: after ``failures`` within ``seconds``, the name is locked
    for ``seconds`` (whatever the password)."""

    def __init__(self, *, failures: int, seconds: float, clock=time.monotonic) -> None:
        self.failures = failures
        self.seconds = seconds
        self._clock = clock
        self._fails: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def locked(self, name: str) -> bool:
        now = self._clock()
        with self._lock:
            recent = [t for t in self._fails.get(name, []) if now - t < self.seconds]
            self._fails[name] = recent
            return len(recent) >= self.failures

    def failed(self, name: str) -> None:
        with self._lock:
            self._fails.setdefault(name, []).append(self._clock())

    def succeeded(self, name: str) -> None:
        with self._lock:
            self._fails.pop(name, None)


def reader_pseudonym(key: bytes, name: str) -> str:
    """A stable pseudonym of a reader (HMAC-SHA256 with the monitoring key)."""
    return "reader-" + hmac.new(key, b"reader\0" + name.encode("utf-8"), hashlib.sha256).hexdigest()[:16]

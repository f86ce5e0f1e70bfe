"""``cxr-ai users`` and ``cxr-ai demo --serve`` as a user runs them."""

from __future__ import annotations

import io
import os
import re
import signal
import subprocess
import sys
import time
import tomllib
import urllib.request
from pathlib import Path

import pytest

from cxr_ai.service.web.auth import UserStore
from cxr_ai.service.web.users_cli import users_main

REPO = Path(__file__).resolve().parents[1]


def run_users(monkeypatch, capsys, users: Path, *args: str, stdin: str = "") -> tuple[int, str, str]:
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    code = users_main(["--users-file", str(users), *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_users_add_set_password_disable_list(tmp_path: Path, monkeypatch, capsys) -> None:
    users = tmp_path / "users.toml"
    assert run_users(monkeypatch, capsys, users, "add", "drwho", "--password-stdin",
                     stdin="first long password\n")[0] == 0
    assert run_users(monkeypatch, capsys, users, "add", "boss", "--role", "admin", "--password-stdin",
                     stdin="another long password\n")[0] == 0
    assert oct(users.stat().st_mode & 0o777) == "0o600"
    text = users.read_text()
    assert "first long password" not in text and "$argon2id$" in text
    assert {u["name"]: u["role"] for u in tomllib.loads(text)["users"]} == {"drwho": "radiologist", "boss": "admin"}
    store = UserStore(users)
    assert store.verify("drwho", "first long password") is not None
    assert run_users(monkeypatch, capsys, users, "set-password", "drwho", "--password-stdin",
                     stdin="second long password\n")[0] == 0
    assert store.verify("drwho", "first long password") is None
    assert store.verify("drwho", "second long password") is not None
    assert run_users(monkeypatch, capsys, users, "disable", "drwho")[0] == 0
    assert store.verify("drwho", "second long password") is None
    code, out, _ = run_users(monkeypatch, capsys, users, "list")
    assert re.search(r"drwho\s+radiologist\s+disabled", out) and re.search(r"boss\s+admin\s+active", out)
    # clear refusals, nothing changed
    code, _, err = run_users(monkeypatch, capsys, users, "add", "boss", "--password-stdin", stdin="third long password\n")
    assert code == 2 and "already exists" in err
    code, _, err = run_users(monkeypatch, capsys, users, "add", "x y", "--password-stdin", stdin="third long password\n")
    assert code == 2 and "not allowed" in err
    code, _, err = run_users(monkeypatch, capsys, users, "set-password", "nobody", "--password-stdin",
                             stdin="third long password\n")
    assert code == 2 and "no user 'nobody'" in err
    code, _, err = run_users(monkeypatch, capsys, users, "set-password", "boss", "--password-stdin", stdin="short\n")
    assert code == 2 and "too short" in err


@pytest.mark.slow
def test_demo_serve_keeps_pages_running_with_the_demo_studies(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "cxr_ai", "demo", "--n", "2", "--size", "256", "--out",
                             str(tmp_path), "--serve", "--http-port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url, printed = None, []
        deadline = time.monotonic() + 300
        while url is None and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            printed.append(line)
            m = re.match(r"Worklist: (http://127\.0\.0\.1:\d+/)", line.strip())
            url = m.group(1) if m else None
        assert url, "".join(printed)
        assert any("Triage order" in line for line in printed)
        demo_jobs = re.findall(r"^\s+\d+\. job (J[0-9a-f]+)", "".join(printed), re.M)
        with urllib.request.urlopen(url, timeout=30) as r:  # loopback, no users: open
            html = r.read().decode()
        shown = re.findall(r'data-job="(J[0-9a-f]+)"', html)
        assert shown == demo_jobs[: len(shown)] and set(shown) <= set(demo_jobs) and shown
        assert proc.poll() is None, "the demo exited instead of serving"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0


def test_a_running_service_sees_users_changed_by_another_process(tmp_path: Path) -> None:
    """The service keeps the parsed users file; `cxr-ai users` (another process, another
    store) changing it must show at the service's next look-up."""
    from cxr_ai.service.web.auth import UserStore

    path = tmp_path / "users.toml"
    service, command_line = UserStore(path), UserStore(path)
    assert service.users() == []
    command_line.add("drwho", password="correct horse battery", role="radiologist")
    assert [u.name for u in service.users()] == ["drwho"]
    assert service.get("drwho") is not None and not service.get("drwho").disabled
    command_line.set_disabled("drwho")
    assert service.get("drwho").disabled
    command_line.add("admin1", password="another long password", role="admin")
    assert sorted(u.name for u in service.users()) == ["admin1", "drwho"]

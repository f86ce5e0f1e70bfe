"""``cxr-ai users add|disable|enable|list|set-password``: the web pages' local users.

Passwords are read from the terminal (twice), or from standard input with
``--password-stdin`` (scripts); never from the command line, where other users could see them.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cxr_ai.errors import ConfigError
from cxr_ai.service.web.auth import ROLES, UserStore


def add_users_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("users", help="manage the web pages' users (add, disable, list, set-password)",
                              description="Manage the local users of the web pages (argon2 password hashes "
                              "in [web] users_file).")
    _fill(p)
    p.set_defaults(func=_cmd_users)
    return p


def _fill(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="site config TOML (finds [web] users_file)")
    p.add_argument("--users-file", default=None, help="the users file itself (overrides the config)")
    sub = p.add_subparsers(dest="action", required=True)
    a = sub.add_parser("add", help="add a user")
    a.add_argument("name")
    a.add_argument("--role", choices=ROLES, default="radiologist")
    a.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    s = sub.add_parser("set-password", help="change a user's password")
    s.add_argument("name")
    s.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    d = sub.add_parser("disable", help="disable a user (sign-in refused; the entry stays for the audit trail)")
    d.add_argument("name")
    e = sub.add_parser("enable", help="enable a disabled user again")
    e.add_argument("name")
    sub.add_parser("list", help="list users, roles and whether they are disabled")


def _users_file(args: argparse.Namespace) -> Path:
    if args.users_file:
        return Path(args.users_file)
    from cxr_ai.config import load_settings
    from cxr_ai.service import validate_config
    from cxr_ai.service.web.settings import WebSettings

    loaded = load_settings(args.config)
    cfg = loaded.config
    settings = validate_config(cfg, base_dir=loaded.base_dir, secrets=loaded.secrets)
    return WebSettings.for_service(cfg, settings).users_file


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise ConfigError("the two passwords differ; nothing was changed")
    return first


def _cmd_users(args: argparse.Namespace) -> int:
    try:
        store = UserStore(_users_file(args))
        if args.action == "add":
            user = store.add(args.name, password=_password(args), role=args.role)
            print(f"added {user.name} ({user.role}) to {store.path}")
        elif args.action == "set-password":
            store.set_password(args.name, password=_password(args))
            print(f"password of {args.name} changed")
        elif args.action in ("disable", "enable"):
            store.set_disabled(args.name, disabled=args.action == "disable")
            print(f"{args.name} {args.action}d")
        else:
            users = store.users()
            if not users:
                print(f"no users in {store.path}: the pages are open on loopback only")
            for u in users:
                print(f"{u.name:24s} {u.role:12s} {'disabled' if u.disabled else 'active'}")
    except ConfigError as exc:
        print(f"cxr-ai users: error: {exc}", file=sys.stderr)
        return 2
    return 0


def users_main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cxr-ai users", description="Manage the web pages' users.")
    _fill(parser)
    return _cmd_users(parser.parse_args(argv))

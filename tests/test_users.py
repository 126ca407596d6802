"""Users: the CLI, passwords, API keys, disabling; no default accounts."""
from __future__ import annotations

import re
import subprocess
import sys
import time

import pytest

from backend.db import Database
from backend import users

from tests.conftest import ROOT


@pytest.fixture
def db(tmp_path):
    d = Database(f"sqlite:///{tmp_path / 'u.db'}")
    d.migrate()
    return d


def run_cli(data_dir, *args):
    return subprocess.run([sys.executable, "-m", "backend.users", "--data-dir", str(data_dir), *args],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)


def test_cli_adds_user_printing_one_time_password_and_key_that_work(tmp_path):
    out = run_cli(tmp_path, "add", "ada", "--role", "annotator")
    assert out.returncode == 0, out.stderr
    password = re.search(r"password: (\S+)", out.stdout).group(1)
    api_key = re.search(r"api key:\s+(\S+)", out.stdout).group(1)
    db = Database(f"sqlite:///{tmp_path / 'playground.db'}")
    assert users.authenticate_password(db, "ada", password).role == "annotator"
    assert users.user_for_api_key(db, api_key).name == "ada"
    listed = run_cli(tmp_path, "list")
    assert "ada" in listed.stdout and "annotator" in listed.stdout
    assert run_cli(tmp_path, "disable", "ada").returncode == 0
    assert users.authenticate_password(db, "ada", password) is None
    assert users.user_for_api_key(db, api_key) is None
    # Only hashes are stored: neither secret appears in the database files. (Close our connections
    # first: reading the file in this process would drop SQLite's POSIX locks on it.)
    db.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("playground.db*"))
    assert b"ada" in raw and password.encode() not in raw and api_key.encode() not in raw


def test_cli_refuses_unknown_role_and_duplicate(tmp_path):
    bad = run_cli(tmp_path, "add", "x", "--role", "superuser")
    assert bad.returncode != 0 and "superuser" in bad.stderr
    assert run_cli(tmp_path, "add", "x", "--role", "learner").returncode == 0
    dup = run_cli(tmp_path, "add", "x", "--role", "learner")
    assert dup.returncode != 0 and "already exists" in dup.stderr


def test_fresh_database_has_no_users_and_no_default_password(db):
    assert users.list_users(db) == []
    for name, pw in [("admin", "admin"), ("admin", "password"), ("root", "")]:
        assert users.authenticate_password(db, name, pw) is None


def test_wrong_password_and_unknown_key_are_refused(db):
    u, pw, key = users.add_user(db, "bo", "operator")
    assert users.authenticate_password(db, "bo", pw + "x") is None
    assert users.user_for_api_key(db, key + "x") is None
    token = users.start_session(db, u)
    assert users.user_for_session(db, token).name == "bo"
    users.end_session(db, token)
    assert users.user_for_session(db, token) is None


def test_reset_replaces_both_secrets(db):
    _, pw, key = users.add_user(db, "cy", "admin")
    pw2, key2 = users.reset_credentials(db, "cy")
    assert users.authenticate_password(db, "cy", pw) is None and users.user_for_api_key(db, key) is None
    assert users.authenticate_password(db, "cy", pw2) and users.user_for_api_key(db, key2)


def test_a_remembered_caller_is_forgotten_when_disabled_reset_or_logged_out(db):
    for name in ("a", "b", "c"):
        users.add_user(db, name, "annotator")
    _, _, key_a = users.add_user(db, "ka", "annotator")
    assert users.user_for_api_key(db, key_a, remember=True).name == "ka"
    assert users.remembered_user(db, "key", key_a).name == "ka"
    users.set_active(db, "ka", False)
    assert users.remembered_user(db, "key", key_a) is None
    assert users.user_for_api_key(db, key_a, remember=True) is None

    _, _, key_b = users.add_user(db, "kb", "annotator")
    assert users.user_for_api_key(db, key_b, remember=True).name == "kb"
    new_password, new_key = users.reset_credentials(db, "kb")
    assert users.user_for_api_key(db, key_b, remember=True) is None
    assert users.user_for_api_key(db, new_key, remember=True).name == "kb"

    kc = users.add_user(db, "kc", "annotator")[0]
    token = users.start_session(db, kc)
    assert users.user_for_session(db, token, remember=True).name == "kc"
    users.end_session(db, token)
    assert users.user_for_session(db, token, remember=True) is None


def test_a_change_from_another_process_shows_once_the_memory_expires(tmp_path, monkeypatch):
    monkeypatch.setattr(users, "REMEMBER_SECONDS", 0.5)
    assert run_cli(tmp_path, "add", "ada", "--role", "annotator").returncode == 0
    db = Database(f"sqlite:///{tmp_path / 'playground.db'}")
    out = run_cli(tmp_path, "reset", "ada")
    api_key = re.search(r"api key:\s+(\S+)", out.stdout).group(1)
    assert users.user_for_api_key(db, api_key, remember=True).name == "ada"
    assert run_cli(tmp_path, "disable", "ada").returncode == 0
    assert users.user_for_api_key(db, api_key) is None  # the database knows at once
    started = time.monotonic()
    while users.user_for_api_key(db, api_key, remember=True) is not None:  # this process, once it forgets
        assert time.monotonic() - started < users.REMEMBER_SECONDS + 2, "a disabled key is remembered too long"
        time.sleep(0.05)


def test_remembered_callers_are_bounded_in_number(db, monkeypatch):
    monkeypatch.setattr(users, "REMEMBER_MAX", 3)
    keys = [users.add_user(db, f"u{i}", "learner")[2] for i in range(5)]
    for k in keys:
        users.user_for_api_key(db, k, remember=True)
    assert len(users._remembered) <= 3
    assert all(users.user_for_api_key(db, k, remember=True) for k in keys)

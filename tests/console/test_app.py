"""The console app in-process (no browser, no listener): cookies, headers, redirects, audit events."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from agent.config import ConsoleConfig, TlsConfig, parse_config
from agent.console.app import SECURITY_HEADERS, SESSION_COOKIE, create_console_app
from agent.console.auth import add_admin
from agent.console.known_browsers import KNOWN_BROWSER_COOKIE
from agent.service import SiteService

PASSWORD = "a long enough passphrase"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[SiteService]:
    cfg = parse_config(
        {"site": {"id": "site-1"}, "work_dir": str(tmp_path / "work"), "device": "cpu"},
        environ={},
        check_paths=False,
    )
    svc = SiteService.open(cfg)
    add_admin(svc.db, svc.audit, "alice", PASSWORD, "cli:test")
    try:
        yield svc
    finally:
        svc.db.dispose()


def _login(
    client: TestClient, next_: str = "/", password: str = PASSWORD, name: str = "alice"
) -> httpx.Response:
    page = client.get("/login")
    token = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
    assert token is not None
    data = {"name": name, "password": password, "csrf_token": token.group(1), "next": next_}
    return client.post("/login", data=data, follow_redirects=False)


@pytest.mark.parametrize("tls", [False, True])
def test_the_session_cookie_is_httponly_strict_and_secure_under_tls(service: SiteService, tls: bool) -> None:
    config = ConsoleConfig(enabled=True)
    if tls:
        config = ConsoleConfig(enabled=True, tls=TlsConfig(cert_file=Path("c"), key_file=Path("k")))
    base = "https://testserver" if tls else "http://testserver"
    with TestClient(create_console_app(service, config), base_url=base) as client:
        r = _login(client)
        assert r.status_code == 303 and r.headers["location"] == "/"
        cookie = next(c for c in r.headers.get_list("set-cookie") if c.startswith(f"{SESSION_COOKIE}="))
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/"} <= attributes
        assert ("secure" in attributes) is tls
        assert client.get("/").status_code == 200


def test_every_answer_carries_the_security_headers_and_no_store(service: SiteService) -> None:
    with TestClient(create_console_app(service, ConsoleConfig(enabled=True))) as client:
        for r in (
            client.get("/login"),
            client.get("/", follow_redirects=False),
            client.get("/static/console.css"),
        ):
            for key, value in SECURITY_HEADERS.items():
                assert r.headers[key] == value
        _login(client)
        page = client.get("/")
        assert page.status_code == 200 and "<script" not in page.text
        assert client.get("/docs").status_code in (303, 404) and client.get("/openapi.json").status_code in (
            303,
            404,
        )


def test_the_login_redirects_only_within_the_console(service: SiteService) -> None:
    with TestClient(create_console_app(service, ConsoleConfig(enabled=True))) as client:
        assert _login(client, next_="//evil.example/x").headers["location"] == "/"
        client.cookies.clear()
        assert _login(client, next_="https://evil.example/").headers["location"] == "/"
        client.cookies.clear()
        assert (
            _login(client, next_="/audit?action=plan.approved").headers["location"]
            == "/audit?action=plan.approved"
        )


def test_login_and_logout_are_audited_under_the_admins_name_and_logout_ends_the_session(
    service: SiteService,
) -> None:
    with TestClient(create_console_app(service, ConsoleConfig(enabled=True))) as client:
        assert _login(client, password="wrong password!").status_code == 401
        _login(client)
        page = client.get("/audit")
        csrf = re.search(r'name="csrf_token" value="([^"]+)"', page.text)
        assert csrf is not None
        session = client.cookies.get(SESSION_COOKIE)
        r = client.post("/logout", data={"csrf_token": csrf.group(1)}, follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"] == "/login"
        # The old cookie, replayed, no longer opens anything.
        client.cookies.set(SESSION_COOKIE, session or "")
        assert client.get("/audit", follow_redirects=False).status_code == 303
    actions = [
        (e["action"], e["actor"]) for e in service.audit.tail(10) if e["action"].startswith("console.")
    ]
    assert actions[-3:] == [
        ("console.login_refused", "anonymous"),
        ("console.login", "console:alice"),
        ("console.logout", "console:alice"),
    ]


def test_unknown_pages_and_subjects_are_404_without_a_path(service: SiteService) -> None:
    with TestClient(create_console_app(service, ConsoleConfig(enabled=True))) as client:
        _login(client)
        for path in ("/rounds/train/nope", "/rounds/other/nope", "/datasets/nope/subjects/abc"):
            r = client.get(path)
            assert r.status_code == 404, path
            assert str(service.cfg.work_dir) not in r.text


def _from_address(app: FastAPI, host: str, browser: str | None = None) -> TestClient:
    """A client of APP at HOST; with BROWSER, holding that known-browser cookie."""
    client = TestClient(app, client=(host, 40000))
    if browser is not None:
        client.cookies.set(KNOWN_BROWSER_COOKIE, browser, path="/login")
    return client


def test_failed_logins_for_one_name_from_many_addresses_are_throttled_per_name(service: SiteService) -> None:
    add_admin(service.db, service.audit, "bob", PASSWORD, "cli:test")
    app = create_console_app(
        service, ConsoleConfig(enabled=True, login_failures=3, login_failures_per_name=4)
    )

    # Two guesses from each of two addresses: under each address's limit of 3, at the name's 4.
    for host in ("10.0.0.1", "10.0.0.2"):
        with _from_address(app, host) as client:
            for _ in range(2):
                assert _login(client, password="a wrong guess at it").status_code == 401
    with _from_address(app, "10.0.0.3") as client:
        refused = _login(client)  # the right password, from a fresh address: not even checked
        assert refused.status_code == 429 and "for this name" in refused.text
        assert 1 <= int(refused.headers["Retry-After"]) <= 900
        assert SESSION_COOKIE not in client.cookies
        # Another account from the same address is not held back.
        assert _login(client, name="bob").status_code == 303
    # A name with no account is counted the same way: a 429 does not tell which names exist.
    with _from_address(app, "10.0.0.4") as client:
        for _ in range(2):
            assert _login(client, name="mallory", password="x" * 12).status_code == 401
    with _from_address(app, "10.0.0.5") as client:
        for _ in range(2):
            assert _login(client, name="mallory", password="x" * 12).status_code == 401
        assert _login(client, name="mallory", password="x" * 12).status_code == 429
    refusals = service.audit.events(action="console.login_refused")
    assert [e["details"]["reason"] for e in refusals].count("wrong name or password") == 8
    assert [e["details"]["reason"] for e in refusals].count("too many refused requests") == 2


def test_a_browser_that_logged_in_before_is_not_locked_out_by_a_throttled_name(service: SiteService) -> None:
    app = create_console_app(
        service, ConsoleConfig(enabled=True, login_failures=3, login_failures_per_name=4)
    )

    with _from_address(app, "10.0.0.9") as client:
        assert _login(client).status_code == 303
        browser = client.cookies.get(KNOWN_BROWSER_COOKIE)
    assert browser
    # Someone fails on purpose with alice's name: their address is held back (3), then the name (4).
    with _from_address(app, "10.0.0.1") as client:
        for _ in range(3):
            assert _login(client, password="a wrong guess at it").status_code == 401
        assert _login(client, password="a wrong guess at it").status_code == 429
    with _from_address(app, "10.0.0.2") as client:
        assert _login(client, password="a wrong guess at it").status_code == 401
    with _from_address(app, "10.0.0.3") as client:
        assert _login(client).status_code == 429  # the name is held back for a new browser
    # Alice's browser is not, even from the guesser's (throttled) address, e.g. one proxy's.
    with _from_address(app, "10.0.0.1", browser) as client:
        assert _login(client).status_code == 303
    # Its own failures are counted per browser, at the per-address limit.
    with _from_address(app, "10.0.0.9", browser) as client:
        for _ in range(3):
            assert _login(client, password="alice mistyped it").status_code == 401
        refused = _login(client)
        assert refused.status_code == 429 and "from this browser" in refused.text
        assert SESSION_COOKIE not in client.cookies
    # The cookie is alice's alone: typed with bob's name it counts as any browser's.
    add_admin(service.db, service.audit, "bob", PASSWORD, "cli:test")
    with _from_address(app, "10.0.0.5", browser) as client:
        assert _login(client, name="bob").status_code == 303
    known = [
        e
        for e in service.audit.events(action="console.login_refused")
        if e["details"].get("browser") == "known"
    ]
    assert len(known) == 3 and all(e["details"]["client"] == "10.0.0.9" for e in known)


@pytest.mark.parametrize("days", [30, 0])
def test_the_known_browser_cookie_is_httponly_strict_scoped_to_the_login_and_can_be_off(
    service: SiteService, days: int
) -> None:
    app = create_console_app(service, ConsoleConfig(enabled=True, known_browser_days=days))
    with TestClient(app) as client:
        r = _login(client)
        assert r.status_code == 303
        cookies = [c for c in r.headers.get_list("set-cookie") if c.startswith(f"{KNOWN_BROWSER_COOKIE}=")]
        if days == 0:
            assert cookies == []
            return
        [cookie] = cookies
        attributes = {a.strip().lower() for a in cookie.split(";")[1:]}
        assert {"httponly", "samesite=strict", "path=/login", f"max-age={days * 86400}"} <= attributes

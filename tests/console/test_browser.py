"""The admin console in a real browser: Debian's chromium, headless, driven by Selenium.

One agent (generated DICOM data, approval policy manual, the console on a port of its own) and
one browser serve the whole module; the tests run in file order, the throttling test last (it
locks 127.0.0.1 out of the login for the rest of the window). Screenshots of the main pages go
to build/console-screenshots/ (CI keeps them as artifacts; two of them are in docs/ and the README).
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from selenium import webdriver
from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support.wait import WebDriverWait

from agent.access.approvals import approve_plan
from agent.audit.chain import AuditLog
from agent.config import load_config
from agent.console.auth import add_admin
from agent.db.engine import Database, open_database
from agent.errors import PlanNotApproved
from tests.fixtures.agents import (
    REPO,
    GeneratedSite,
    RunningAgent,
    add_tokens,
    free_port,
    make_site,
    plan_text,
    start_agent,
    tiny_plan,
    wait_status,
)

pytestmark = pytest.mark.browser

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
SHOTS = REPO / "build" / "console-screenshots"
ADMIN = "alice"
PASSWORD = "correct horse battery staple"
LOGIN_FAILURES = 3
PAGES = ("/", "/datasets", "/plans", "/rounds", "/egress", "/audit")
# Long enough that the round page is seen refreshing itself (every 2 s) while it runs: 300 epochs
# of this plan once lasted a few seconds, and ended before the first refresh once batches
# were loaded with one copy instead of two.
LIVE_EPOCHS = 1200


@dataclass
class Console:
    site: GeneratedSite
    agent: RunningAgent
    url: str
    coordinator: str
    admin_token: str

    def coordinator_client(self) -> httpx.Client:
        return self.agent.client(self.coordinator)

    def admin_api(self) -> httpx.Client:
        return self.agent.client(self.admin_token)


@contextlib.contextmanager
def _database(config_path: Path) -> Iterator[Database]:
    db = open_database(load_config(config_path).db_url)
    try:
        yield db
    finally:
        db.dispose()


@pytest.fixture(scope="module")
def console(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Console]:
    out = tmp_path_factory.mktemp("console")
    port = free_port()
    site = make_site(
        out,
        subjects=4,
        size=32,
        overrides={
            "approval": {"policy": "manual"},
            "console": {"enabled": True, "port": port, "login_failures": LOGIN_FAILURES},
            # A budget, so that the privacy page has one to show; rounds without DP still run.
            "privacy": {"budgets": {"brain": {"epsilon": 8.0, "delta": 1e-5, "allow_non_dp": True}}},
        },
    )
    tokens = add_tokens(site.config_path, coordinator="coord", admin="auditor")
    # In-process, as `fedsite admin-users add` does it (its command is tested in test_admin_users.py).
    with _database(site.config_path) as db:
        add_admin(db, AuditLog(db), ADMIN, PASSWORD, "cli:test")
    agent = start_agent(site.config_path)
    try:
        yield Console(site, agent, f"http://127.0.0.1:{port}", tokens["coord"], tokens["auditor"])
    finally:
        agent.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    assert CHROMIUM.exists() and CHROMEDRIVER.exists(), (
        "the browser tests need Debian's chromium and chromium-driver (.ci/run installs them: "
        "apt-get install chromium chromium-driver)"
    )
    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must not look for a driver online
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(arg)
    options.add_argument("--window-size=1400,1000")
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    driver.set_page_load_timeout(60)
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield driver
    finally:
        driver.quit()


def _shot(driver: WebDriver, name: str) -> None:
    driver.save_screenshot(str(SHOTS / f"{name}.png"))


def _login(driver: WebDriver, url: str, password: str = PASSWORD, name: str = ADMIN) -> None:
    driver.get(f"{url}/login")
    driver.find_element(By.ID, "name").send_keys(name)
    driver.find_element(By.ID, "password").send_keys(password)
    _click_and_load(driver, driver.find_element(By.ID, "login"))


def _click_and_load(driver: WebDriver, element: WebElement) -> None:
    """Click what submits a form or follows a link, and wait for the page it leads to.

    A click returns once the event is dispatched, which can be before the browser has replaced
    the page: reading the next page straight after it finds the old one (or nothing).
    """
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    WebDriverWait(driver, 60).until(_left_the_document(old))
    # While the new document loads, a script may find no context to run in: asked again.
    WebDriverWait(driver, 60, ignored_exceptions=(WebDriverException,)).until(
        lambda d: d.execute_script("return document.readyState") == "complete"
    )


def _left_the_document(old: WebElement) -> Callable[[WebDriver], bool]:
    """True once OLD is no longer in the page: the browser has replaced the document.

    Selenium's `staleness_of` expects 'stale element' for that, but while the browser swaps
    documents chromedriver may answer 'Node with given id does not belong to the document', or
    another inspector error: the first means the node left too, any other is asked again.
    """

    def check(_driver: WebDriver) -> bool:
        try:
            old.is_enabled()
        except StaleElementReferenceException:
            return True
        except WebDriverException as exc:
            return "does not belong to the document" in str(exc)
        return False

    return check


def _ensure_logged_in(driver: WebDriver, url: str) -> None:
    driver.get(f"{url}/")
    if "/login" in driver.current_url:
        _login(driver, url)
    assert driver.find_elements(By.ID, "logout"), driver.page_source[:2000]


def _wait(predicate: object, timeout: float = 120.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _refused_hash(console: Console, plan: dict[str, object]) -> str:
    with console.coordinator_client() as c:
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
    assert r.status_code == 403, r.text
    digest = PlanNotApproved.hash_in(r.json()["detail"])
    assert digest is not None, r.text
    return digest


def _audit(console: Console, action: str) -> list[dict[str, Any]]:
    with console.admin_api() as c:
        r = c.get("/v1/audit", params={"limit": 1000})
    assert r.status_code == 200, r.text
    return [e for e in r.json()["events"] if e["action"] == action]


def test_an_anonymous_visit_to_any_page_is_sent_to_the_login(console: Console, browser: WebDriver) -> None:
    browser.delete_all_cookies()
    key = "0" * 64
    for path in (*PAGES, "/datasets/brain/subjects/abc", f"/rounds/train/{key}"):
        browser.get(console.url + path)
        assert browser.current_url.startswith(f"{console.url}/login?next="), (path, browser.current_url)
        assert browser.find_elements(By.ID, "login-form"), path
    _shot(browser, "login")
    # Pixels too: an anonymous request for a thumbnail gets a redirect, not an image.
    with httpx.Client(base_url=console.url) as c:
        r = c.get("/datasets/brain/subjects/abc/slices/0.png")
    assert r.status_code == 303 and r.headers["location"].startswith("/login")
    assert not r.content.startswith(b"\x89PNG")


def test_manual_approval_in_the_console_lets_the_coordinators_retry_run(
    console: Console, browser: WebDriver
) -> None:
    plan = tiny_plan(32, init="random", local_epochs=2)
    digest = _refused_hash(console, plan)

    _login(browser, console.url)
    assert browser.current_url.rstrip("/") == console.url, browser.current_url
    browser.get(f"{console.url}/plans")
    rows = browser.find_elements(By.CSS_SELECTOR, f"tr.pending-plan[data-hash='{digest}']")
    assert len(rows) == 1, browser.page_source[:3000]
    row = rows[0]
    assert "unet" in row.text and "token:coord" in row.text
    assert [td.text for td in row.find_elements(By.TAG_NAME, "td")][1:5] == [
        "unet",
        "2",
        "brain",
        "token:coord",
    ]
    expires = row.find_element(By.CSS_SELECTOR, "input.expires")
    browser.execute_script("arguments[0].value = '2099-12-31'", expires)
    row.find_element(By.CSS_SELECTOR, "input.note").send_keys("study 42")
    _shot(browser, "plans-pending")
    _click_and_load(browser, row.find_element(By.CSS_SELECTOR, "button.approve"))

    assert f"approved {digest}" in browser.find_element(By.ID, "done").text
    assert not browser.find_elements(By.CSS_SELECTOR, f"tr.pending-plan[data-hash='{digest}']")
    approval = browser.find_element(By.CSS_SELECTOR, f"tr.approval[data-hash='{digest}']")
    assert "active" in approval.text and "2100-01-01" in approval.text and "study 42" in approval.text
    assert approval.find_element(By.CSS_SELECTOR, ".approved-by").text == f"console:{ADMIN}"
    _shot(browser, "plans")

    with console.coordinator_client() as c:
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
        assert r.status_code == 202, r.text
        done = wait_status(c, f"/v1/rounds/{r.json()['round_id']}", ("completed", "failed"))
    assert done["status"] == "completed", done

    browser.get(f"{console.url}/audit?action=plan.approved")
    events = browser.find_elements(By.CSS_SELECTOR, "tr.event[data-action='plan.approved']")
    assert [e.find_element(By.CSS_SELECTOR, ".actor").text for e in events] == [f"console:{ADMIN}"]
    assert digest in events[0].text
    _click_and_load(browser, browser.find_element(By.ID, "verify"))
    assert browser.find_element(By.ID, "verify-status").text == "Chain intact"
    anchor = browser.find_element(By.ID, "anchor").get_attribute("value") or ""
    event_id, head = anchor.split(":")
    with console.admin_api() as c:
        assert c.get("/v1/audit/verify").json()["ok"] is True
        anchored = c.get("/v1/audit", params={"since_id": int(event_id) - 1, "limit": 1}).json()["events"]
    # The anchor is the head the verification reached: that event, with that hash.
    assert anchored[0]["id"] == int(event_id) and anchored[0]["hash"] == head
    recorded = _audit(console, "console.audit_verified")[-1]
    assert recorded["actor"] == f"console:{ADMIN}" and recorded["details"]["head"] == head
    _shot(browser, "audit-verified")


def test_a_round_shows_live_progress_then_its_metrics_and_the_audited_update_hash(
    console: Console, browser: WebDriver
) -> None:
    plan = tiny_plan(32, init="random", local_epochs=LIVE_EPOCHS, round_id="live-round")
    with _database(console.site.config_path) as db:
        approve_plan(db, AuditLog(db), _refused_hash(console, plan), "cli:test")
    _ensure_logged_in(browser, console.url)
    with console.coordinator_client() as c:
        r = c.post("/v1/rounds", files={"plan": (None, plan_text(plan))})
    assert r.status_code == 202, r.text
    browser.get(f"{console.url}/rounds/train/live-round")
    assert browser.find_element(By.ID, "status").text in ("queued", "running")
    assert browser.find_elements(By.ID, "live")
    # While the round is live the page reloads itself (no script: a meta refresh): a mark left on
    # this page's window is gone once it has.
    browser.execute_script("window.fedsiteTestMark = 1")

    def reloaded() -> bool:
        try:
            return bool(browser.execute_script("return window.fedsiteTestMark === undefined"))
        except WebDriverException:  # caught mid-reload, with no document to run in: asked again
            return False

    _wait(reloaded, timeout=30, what="the round page to reload itself")
    seen: list[tuple[str, str]] = []

    def state() -> str:
        # Read as often as the test can, so that a fast machine's short run is still seen live.
        try:
            status = browser.find_element(By.ID, "status").text
            epochs = browser.find_elements(By.CSS_SELECTOR, ".progress-epoch")
            epoch = epochs[0].text if epochs else ""
            live = bool(browser.find_elements(By.ID, "live"))
        except Exception:  # the page is being replaced by its own refresh
            return ""
        if (status, epoch) not in seen:
            seen.append((status, epoch))
            if status == "running" and epoch and live and len([s for s in seen if s[1]]) == 1:
                _shot(browser, "round-live")
        if status in ("queued", "running"):
            browser.refresh()
        return status

    _wait(lambda: state() in ("completed", "failed"), what="the round page to show the round's end")
    assert seen[-1][0] == "completed", seen
    running = [epoch for status, epoch in seen if status == "running" and epoch]
    assert running, f"no live progress seen: {seen}"
    assert int(running[0]) < LIVE_EPOCHS
    assert not browser.find_elements(By.ID, "live")
    _shot(browser, "round")

    page_sha = browser.find_element(By.ID, "update-sha256").text
    page_bytes = int(browser.find_element(By.ID, "bytes-out").text)
    dice = browser.find_elements(By.CSS_SELECTOR, "dd.metric")
    assert dice and browser.find_element(By.ID, "num-samples").text.isdigit()
    released = [e for e in _audit(console, "egress.update") if e["details"]["round_id"] == "live-round"]
    assert len(released) == 1
    assert page_sha == released[0]["details"]["sha256"] and page_bytes == released[0]["details"]["bytes"]
    with console.coordinator_client() as c:
        status = c.get("/v1/rounds/live-round").json()
        update = c.get("/v1/rounds/live-round/update")
    assert status["update_sha256"] == page_sha == update.headers["X-Content-SHA256"]
    for key, value in status["metrics"].items():
        assert browser.find_element(By.ID, f"metric-{key}").text == str(value)

    browser.get(f"{console.url}/egress")
    release = browser.find_element(By.CSS_SELECTOR, "tr.release[data-round='live-round']")
    assert release.find_element(By.CSS_SELECTOR, ".sha").text == page_sha
    assert release.find_element(By.CSS_SELECTOR, ".bytes").text == str(page_bytes)
    assert release.find_element(By.CSS_SELECTOR, ".recipient").text == "token:coord"
    _shot(browser, "egress")
    browser.get(f"{console.url}/rounds")
    _shot(browser, "rounds")
    browser.get(f"{console.url}/")
    _shot(browser, "overview")


def test_a_form_without_its_csrf_token_is_refused_and_changes_nothing(
    console: Console, browser: WebDriver
) -> None:
    with _database(console.site.config_path) as db:
        # An approval to try to revoke (the earlier tests of the module made some too).
        approve_plan(db, AuditLog(db), "cd" * 32, "cli:test")
    _ensure_logged_in(browser, console.url)
    browser.get(f"{console.url}/plans")
    active = browser.find_elements(By.CSS_SELECTOR, "tr.approval.active")
    before = len(active)
    assert before >= 1
    digest = active[0].get_attribute("data-hash")
    # The browser submits the revoke form with its token removed.
    form = active[0].find_element(By.CSS_SELECTOR, "form")
    browser.execute_script("arguments[0].querySelector('input[name=csrf_token]').remove()", form)
    _click_and_load(browser, form.find_element(By.CSS_SELECTOR, "button.revoke"))
    assert "CSRF" in browser.find_element(By.ID, "error").text
    # The same with the session's cookie, without a token and with a wrong one: 403 each time.
    cookie = browser.get_cookie("fedsite_console")
    assert cookie is not None and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    with httpx.Client(base_url=console.url, cookies={"fedsite_console": cookie["value"]}) as c:
        for data in ({"plan_hash": digest}, {"plan_hash": digest, "csrf_token": "x" * 43}):
            assert c.post("/plans/revoke", data=data).status_code == 403
            assert c.post("/plans/approve", data={**data, "plan_hash": "ab" * 32}).status_code == 403
        assert c.post("/audit/verify", data={}).status_code == 403
        assert c.post("/logout", data={}).status_code == 403
        # Still logged in: the refused logout ended nothing.
        assert c.get("/plans").status_code == 200
    browser.get(f"{console.url}/plans")
    assert len(browser.find_elements(By.CSS_SELECTOR, "tr.approval.active")) == before
    assert not browser.find_elements(By.CSS_SELECTOR, f"tr.approval[data-hash='{'ab' * 32}']")
    assert not _audit(console, "plan.revoked")
    refused = _audit(console, "console.refused")
    assert len(refused) >= 5 and {e["actor"] for e in refused} == {f"console:{ADMIN}"}
    # The login form has its own token (a cookie of the login page's).
    with httpx.Client(base_url=console.url) as c:
        r = c.post("/login", data={"name": ADMIN, "password": PASSWORD})
    assert r.status_code == 403 and "fedsite_console" not in r.headers.get("set-cookie", "")


def _png_chunks(data: bytes) -> list[bytes]:
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    chunks, at = [], 8
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        chunks.append(data[at + 4 : at + 8])
        at += 12 + length
    return chunks


def test_no_patient_identity_and_no_local_path_in_any_page(console: Console, browser: WebDriver) -> None:
    _ensure_logged_in(browser, console.url)
    browser.get(f"{console.url}/datasets")
    _shot(browser, "datasets")
    browser.find_element(By.CSS_SELECTOR, "#dataset-brain details summary").click()
    links = [a.get_attribute("href") or "" for a in browser.find_elements(By.CSS_SELECTOR, "a.preview-link")]
    assert len(links) == 4
    browser.get(links[0])
    thumbs = browser.find_elements(By.CSS_SELECTOR, "img.thumb")
    assert len(thumbs) == 3
    assert all(browser.execute_script("return arguments[0].naturalWidth", t) > 0 for t in thumbs)
    _shot(browser, "preview")
    sources: dict[str, str] = {}
    for path in (*PAGES, "/audit?action=catalog.scanned", "/rounds/train/live-round"):
        browser.get(console.url + path)
        sources[path] = browser.page_source
    for link in links:
        browser.get(link)
        sources[link] = browser.page_source
    cookie = browser.get_cookie("fedsite_console")
    assert cookie is not None
    site_dir = str(console.site.config_path.parent)
    with httpx.Client(base_url=console.url, cookies={"fedsite_console": cookie["value"]}) as c:
        for link in links:
            for i in range(3):
                r = c.get(f"{link.removeprefix(console.url)}/slices/{i}.png")
                assert r.status_code == 200 and r.headers["content-type"] == "image/png"
                assert r.headers["cache-control"] == "no-store"
                assert _png_chunks(r.content) == [b"IHDR", b"IDAT", b"IEND"]
                sources[f"{link} slice {i}"] = r.content.decode("latin-1")
        for path in PAGES:
            r = c.get(path)
            sources[f"{path} headers"] = str(r.headers)
            assert "<script" not in r.text.lower()
    for where, text in sources.items():
        for ident in console.site.identifying:
            assert ident not in text, f"{ident!r} found in {where}"
        assert "PAT-" not in text, f"a patient id pattern found in {where}"
        assert site_dir not in text and "/tmp/" not in text, f"a local path found in {where}"
    assert len(_audit(console, "console.preview_viewed")) >= 5


def test_the_privacy_page_shows_each_datasets_budget(console: Console, browser: WebDriver) -> None:
    _ensure_logged_in(browser, console.url)
    _click_and_load(browser, browser.find_element(By.ID, "nav-privacy"))
    row = browser.find_element(By.CSS_SELECTOR, "tr.budget[data-dataset='brain']")
    assert row.find_element(By.CSS_SELECTOR, ".budget-epsilon").text == "8.0"
    # The rounds of this module trained without DP: nothing spent, the whole budget remains.
    assert row.find_element(By.CSS_SELECTOR, ".spent").text == "0.0000"
    assert row.find_element(By.CSS_SELECTOR, ".remaining").text == "8.0000"
    _shot(browser, "privacy")


def test_a_wrong_password_is_refused_and_the_address_throttled(console: Console, browser: WebDriver) -> None:
    browser.delete_all_cookies()
    for _ in range(LOGIN_FAILURES):
        _login(browser, console.url, password="not the password at all")
        assert browser.find_element(By.ID, "login-error").text == "Wrong name or password."
        assert browser.get_cookie("fedsite_console") is None
    _login(browser, console.url, password="not the password at all")
    assert "Too many failed logins" in browser.find_element(By.ID, "login-error").text
    # While throttled even the right password is refused, without being checked.
    _login(browser, console.url)
    assert "Too many failed logins" in browser.find_element(By.ID, "login-error").text
    assert browser.get_cookie("fedsite_console") is None
    _shot(browser, "login-throttled")
    refused = _audit(console, "console.login_refused")
    assert len(refused) == LOGIN_FAILURES + 2
    assert {e["details"]["reason"] for e in refused} == {
        "wrong name or password",
        "too many refused requests",
    }
    assert all(PASSWORD not in str(e) for e in refused)

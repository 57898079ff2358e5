"""Known-browser cookies (`agent.console.known_browsers`): bound to one name, signed with a key
of their own, expiring; anything else is not a known browser."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest

from agent.console.known_browsers import MAX_COOKIE_CHARS, KnownBrowsers

SECRET = b"0123456789abcdef" * 4
DAY = 86_400.0


class _Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_a_cookie_names_its_browser_for_its_name_until_it_expires() -> None:
    clock = _Clock()
    browsers = KnownBrowsers(SECRET, 30, clock=clock)
    cookie = browsers.issue("alice")
    browser = browsers.browser_of(cookie, "alice")
    assert browser is not None and len(browser) == 32
    # Another login gives another browser id.
    assert browsers.browser_of(browsers.issue("alice"), "alice") not in (None, browser)
    # For another name, it is nobody's.
    assert browsers.browser_of(cookie, "bob") is None
    assert browsers.browser_of(cookie, "Alice") is None
    clock.now += 30 * DAY - 1
    assert browsers.browser_of(cookie, "alice") == browser
    clock.now += 1
    assert browsers.browser_of(cookie, "alice") is None
    # Issued in the future (a clock set back): not trusted either.
    future = KnownBrowsers(SECRET, 30, clock=lambda: clock.now + DAY).issue("alice")
    assert browsers.browser_of(future, "alice") is None


def test_a_cookie_signed_with_another_secret_or_altered_is_refused() -> None:
    browsers = KnownBrowsers(SECRET, 30)
    other = KnownBrowsers(b"another site's secret", 30).issue("alice")
    assert browsers.browser_of(other, "alice") is None
    body, mac = browsers.issue("alice").split(".")
    payload = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    payload["name"] = "bob"
    renamed = _b64(json.dumps(payload, separators=(",", ":")).encode())
    assert browsers.browser_of(f"{renamed}.{mac}", "bob") is None
    # Signed with the site secret itself (not the derived key): refused.
    raw = _b64(hmac.new(SECRET, renamed.encode(), hashlib.sha256).digest())
    assert browsers.browser_of(f"{renamed}.{raw}", "bob") is None


@pytest.mark.parametrize(
    "cookie",
    ["", "no-dot", "a.b.c", "!!!.???", "x" * (MAX_COOKIE_CHARS + 1), ".", "e30.AAAA"],
    ids=["empty", "no dot", "two dots", "not base64", "too long", "bare dot", "bad mac"],
)
def test_malformed_cookies_are_nobodys(cookie: str) -> None:
    assert KnownBrowsers(SECRET, 30).browser_of(cookie, "alice") is None


def test_zero_days_turns_the_cookie_off() -> None:
    on = KnownBrowsers(SECRET, 30)
    off = KnownBrowsers(SECRET, 0)
    assert not off.enabled and off.browser_of(on.issue("alice"), "alice") is None


def test_a_validly_signed_payload_of_the_wrong_shape_is_nobodys() -> None:
    browsers = KnownBrowsers(SECRET, 30)
    for payload in (b"[1, 2]", b'"alice"', b'{"name": "alice"}', b"not json"):
        cookie = f"{_b64(payload)}.{_b64(browsers._mac(payload))}"
        assert browsers.browser_of(cookie, "alice") is None

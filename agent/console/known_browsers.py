"""Browsers an admin has logged in from: a throttled account name does not lock them out.

The console throttles failed logins per address and per account name (`agent.console.app`).
The per-name count stops a guesser who spreads over many addresses, but on its own it also
lets anyone who can reach the login page lock an admin out for a whole window, by failing on
purpose with that admin's name. So a successful login leaves a cookie that says "this browser
logged in as NAME" (the device cookies of OWASP's advice on lockouts). A login that presents
a valid one for the name it types is counted against that browser alone, with the per-address
limit: the name's count and the address's count do not hold it back, so neither a guesser
elsewhere nor one behind the same proxy can lock that admin out.

The cookie grants nothing by itself: the password is still checked, and its only effect is
which count a failure goes to. It names one account, carries a random browser id and the
time it was issued, and is signed (HMAC-SHA256) with a key derived from the site secret, so
it cannot be made or moved to another name without that secret. It expires after the
configured number of days (`console.known_browser_days`); each successful login renews it.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Callable

KNOWN_BROWSER_COOKIE = "fedsite_console_browser"
# A cookie longer than this is not one of ours; it is refused before any decoding.
MAX_COOKIE_CHARS = 1024
_KEY_LABEL = b"fedsite console known-browser cookie v1"


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class KnownBrowsers:
    """Issues and checks the signed known-browser cookies of one site's console."""

    def __init__(self, site_secret: bytes, days: int, *, clock: Callable[[], float] = time.time) -> None:
        # A key of its own: the site secret also keys subject pseudonyms, and a value signed
        # here must never be one that any other use of the secret would accept.
        self._key = hmac.new(site_secret, _KEY_LABEL, hashlib.sha256).digest()
        self.lifetime_s = days * 86_400
        self._clock = clock

    @property
    def enabled(self) -> bool:
        return self.lifetime_s > 0

    def issue(self, name: str) -> str:
        """A new cookie value for a browser that just logged in as NAME."""
        payload = json.dumps(
            {"name": name, "browser": secrets.token_hex(16), "issued": int(self._clock())},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(payload)}.{_b64(self._mac(payload))}"

    def browser_of(self, cookie: str | None, name: str) -> str | None:
        """The browser id of COOKIE if it is ours, unexpired and issued for NAME; else None."""
        if not self.enabled or not cookie or len(cookie) > MAX_COOKIE_CHARS or cookie.count(".") != 1:
            return None
        body, mac = cookie.split(".")
        try:
            payload, presented = _unb64(body), _unb64(mac)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(presented, self._mac(payload)):
            return None
        try:
            fields = json.loads(payload)
            issued, browser = int(fields["issued"]), str(fields["browser"])
            signed_for = fields["name"]
        except (ValueError, KeyError, TypeError):
            return None
        age = self._clock() - issued
        if signed_for != name or not 0 <= age < self.lifetime_s:
            return None
        return browser

    def _mac(self, payload: bytes) -> bytes:
        return hmac.new(self._key, payload, hashlib.sha256).digest()

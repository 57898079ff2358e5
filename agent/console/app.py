"""The console's FastAPI app: server-rendered pages, plain HTML forms, no JavaScript.

Every page but the login needs a session (an anonymous request is redirected to /login).
Every form carries a CSRF token: the session's for the forms of a logged-in admin, a
pre-session cookie's for the login form; a POST without the right one is answered 403 and
changes nothing. Failed logins are throttled per client address and per account name
(`agent.api.throttle`'s guard, with the console's own limits), or per browser for a browser
that logged in as that name before (`agent.console.known_browsers`), and audited in bounded,
coalesced events. Every action
(login, logout, approve, revoke, verify, a preview of a subject) is an audit event whose actor
is `console:<admin>`. Live progress is a `<meta http-equiv="refresh">` while a job runs.

Every answer carries `Cache-Control: no-store` and a Content-Security-Policy that allows
nothing but this origin's stylesheet and images, and no framing.
"""

from __future__ import annotations

import logging
import secrets
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

from fastapi import Depends, FastAPI, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates
from starlette.middleware.base import BaseHTTPMiddleware, RequestResponseEndpoint

from agent import __version__
from agent.access.approvals import approve_plan, check_plan_hash, parse_expiry, revoke_approval
from agent.api.throttle import RefusalGuard
from agent.config import ConsoleConfig, RefusalsConfig
from agent.console import views
from agent.console.auth import (
    SessionInfo,
    actor_of,
    create_session,
    csrf_matches,
    end_session,
    session_of,
    verify_login,
)
from agent.console.known_browsers import KNOWN_BROWSER_COOKIE, KnownBrowsers
from agent.console.thumbnails import Previews
from agent.errors import AdminUserError, ApprovalError, CsrfRefused, LoginRequired, NotFound, PreviewError
from agent.jobs.states import JobKind
from agent.service import SiteService

log = logging.getLogger("fedsite.console")

HERE = Path(__file__).parent
SESSION_COOKIE = "fedsite_console"
LOGIN_COOKIE = "fedsite_console_login"
LOGIN_REFUSED_ACTION = "console.login_refused"
# The longest name counted per account name: longer ones cannot be accounts, and share a count.
MAX_NAME_KEY = 128
# Live pages reload themselves this often while a job is queued or running.
REFRESH_SECONDS = 2

SECURITY_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}


class _SecurityHeaders(BaseHTTPMiddleware):
    async def dispatch(self, request: Request, call_next: RequestResponseEndpoint) -> Response:
        response = await call_next(request)
        for key, value in SECURITY_HEADERS.items():
            response.headers.setdefault(key, value)
        return response


def _longest(*waits: int | None) -> int | None:
    """The longest of the throttles' waits that apply, or None when none does."""
    given = [w for w in waits if w is not None]
    return max(given) if given else None


def create_console_app(service: SiteService, config: ConsoleConfig | None = None) -> FastAPI:
    """The console of SERVICE's site; CONFIG defaults to the service config's `console`."""
    cfg = config or service.cfg.console
    secure = cfg.tls is not None
    templates = Jinja2Templates(directory=str(HERE / "templates"))
    templates.env.globals.update(
        version=__version__, site_id=service.cfg.site.id, privacy=views.privacy_ledger(service) is not None
    )
    guard = RefusalGuard(
        service.audit,
        RefusalsConfig(max_per_client=cfg.login_failures, window_seconds=cfg.login_window_seconds),
        action=LOGIN_REFUSED_ACTION,
    )
    # The same count per account name, whatever the address: guesses at one account spread over
    # many addresses (or arriving through one proxy's) are held back as well. Every name typed is
    # counted, so that a 429 does not tell which names exist. Its refusals are audited by GUARD.
    names = RefusalGuard(
        service.audit,
        RefusalsConfig(max_per_client=cfg.login_failures_per_name, window_seconds=cfg.login_window_seconds),
        action=LOGIN_REFUSED_ACTION,
    )
    # A browser that logged in as the name it types is counted on its own, at the per-address
    # limit: the name's count cannot lock that admin out (`agent.console.known_browsers`).
    browsers = KnownBrowsers(service.cfg.site_secret(), cfg.known_browser_days)
    per_browser = RefusalGuard(
        service.audit,
        RefusalsConfig(max_per_client=cfg.login_failures, window_seconds=cfg.login_window_seconds),
        action=LOGIN_REFUSED_ACTION,
    )
    previews = Previews(service.db)
    lifetime = timedelta(minutes=cfg.session_minutes)
    idle = timedelta(minutes=cfg.idle_minutes)

    app = FastAPI(
        title="fedsite admin console", version=__version__, docs_url=None, redoc_url=None, openapi_url=None
    )
    app.state.login_guard = guard
    app.add_middleware(_SecurityHeaders)
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    def page(
        request: Request, name: str, admin: SessionInfo | None, status: int = 200, **ctx: Any
    ) -> Response:
        context = {"admin": admin, "csrf": admin.csrf_token if admin else "", "refresh": None, **ctx}
        return templates.TemplateResponse(request, name, context, status_code=status)

    def client_of(request: Request) -> str:
        return request.client.host if request.client is not None else "unknown"

    # ---- sessions ---------------------------------------------------------------------

    def current_admin(request: Request) -> SessionInfo:
        session = session_of(service.db, request.cookies.get(SESSION_COOKIE), idle)
        if session is None:
            raise LoginRequired()
        return session

    Admin = Depends(current_admin)

    def require_csrf(request: Request, admin: SessionInfo, presented: str) -> None:
        if not csrf_matches(admin.csrf_token, presented):
            service.audit.append(
                "console.refused",
                actor=actor_of(admin.user),
                details={"reason": "missing or wrong CSRF token", "path": request.url.path},
            )
            raise CsrfRefused()

    async def login_required(request: Request, _: Exception) -> Response:
        target = request.url.path + (f"?{request.url.query}" if request.url.query else "")
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)

    async def csrf_refused(request: Request, _: Exception) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {"admin": None, "csrf": "", "refresh": None, "title": "Refused",
             "message": "The form came without its security token (CSRF); nothing was changed. "
             "Reload the page and try again."},
            status_code=403,
        )  # fmt: skip

    async def not_found(request: Request, exc: Exception) -> Response:
        return templates.TemplateResponse(
            request,
            "error.html",
            {"admin": None, "csrf": "", "refresh": None, "title": "Not found", "message": str(exc)},
            status_code=404,
        )

    app.add_exception_handler(LoginRequired, login_required)
    app.add_exception_handler(CsrfRefused, csrf_refused)
    app.add_exception_handler(NotFound, not_found)

    # ---- login ------------------------------------------------------------------------

    def safe_next(target: str | None) -> str:
        return target if target and target.startswith("/") and not target.startswith("//") else "/"

    @app.get("/login", response_class=HTMLResponse)
    def login_form(request: Request, next: str = "/") -> Response:
        token = secrets.token_urlsafe(32)
        response = page(request, "login.html", None, login_csrf=token, next=safe_next(next), error=None)
        response.set_cookie(
            LOGIN_COOKIE, token, max_age=900, httponly=True, samesite="strict", secure=secure, path="/login"
        )
        return response

    @app.post("/login", response_class=HTMLResponse)
    def login(
        request: Request,
        name: str = Form(""),
        password: str = Form(""),
        csrf_token: str = Form(""),
        next: str = Form("/"),
    ) -> Response:
        expected = request.cookies.get(LOGIN_COOKIE, "")
        if not expected or not csrf_matches(expected, csrf_token):
            raise CsrfRefused()
        client = client_of(request)
        account = name[:MAX_NAME_KEY]
        browser = browsers.browser_of(request.cookies.get(KNOWN_BROWSER_COOKIE), name)
        guard.flush_due()
        if browser is not None:
            wait = per_browser.retry_after(browser)
        else:
            wait = _longest(guard.retry_after(client), names.retry_after(account))
        if wait is None and verify_login(service.db, name, password):
            try:
                token, session = create_session(service.db, name, lifetime)
            except AdminUserError:  # removed between the check and now
                token = ""
            if token:
                service.audit.append(
                    "console.login", actor=actor_of(session.user), details={"client": client}
                )
                response = RedirectResponse(safe_next(next), status_code=303)
                response.set_cookie(
                    SESSION_COOKIE,
                    token,
                    max_age=int(lifetime.total_seconds()),
                    httponly=True,
                    samesite="strict",
                    secure=secure,
                    path="/",
                )
                response.delete_cookie(LOGIN_COOKIE, path="/login")
                if browsers.enabled:
                    response.set_cookie(
                        KNOWN_BROWSER_COOKIE,
                        browsers.issue(name),
                        max_age=browsers.lifetime_s,
                        httponly=True,
                        samesite="strict",
                        secure=secure,
                        path="/login",
                    )
                return response
        if wait is None:
            if browser is not None:
                wait = per_browser.charge(browser)
            else:
                wait = _longest(guard.charge(client), names.charge(account))
            if wait is None:
                details = {"reason": "wrong name or password", "client": client}
                if browser is not None:
                    details["browser"] = "known"
                guard.refused(client, actor="anonymous", reason="wrong name or password", details=details)
        else:
            guard.throttled(client, method="POST", path="/login")
        status, error = 401, "Wrong name or password."
        headers: dict[str, str] = {}
        if wait is not None:
            status = 429
            where = "from this browser" if browser is not None else "from this address or for this name"
            error = f"Too many failed logins {where}; try again in {wait} s."
            headers = {"Retry-After": str(wait)}
        refused = page(
            request, "login.html", None, status, login_csrf=expected, next=safe_next(next), error=error
        )
        refused.headers.update(headers)
        return refused

    @app.post("/logout")
    def logout(request: Request, admin: SessionInfo = Admin, csrf_token: str = Form("")) -> Response:
        require_csrf(request, admin, csrf_token)
        end_session(service.db, admin)
        service.audit.append("console.logout", actor=actor_of(admin.user), details={})
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(SESSION_COOKIE, path="/")
        return response

    # ---- pages ------------------------------------------------------------------------

    @app.get("/", response_class=HTMLResponse)
    def overview(request: Request, admin: SessionInfo = Admin) -> Response:
        data = views.overview(service)
        live = any(j["live"] for j in data["jobs"])
        return page(request, "overview.html", admin, o=data, refresh=REFRESH_SECONDS if live else None)

    @app.get("/datasets", response_class=HTMLResponse)
    def datasets(request: Request, admin: SessionInfo = Admin) -> Response:
        return page(request, "datasets.html", admin, datasets=views.datasets(service))

    def dataset_config(name: str) -> Any:
        try:
            return service.cfg.dataset(name)
        except KeyError:
            raise NotFound(f"no dataset named {name!r} at this site") from None

    @app.get("/datasets/{name}/subjects/{key}", response_class=HTMLResponse)
    def preview(request: Request, name: str, key: str, admin: SessionInfo = Admin) -> Response:
        ds = dataset_config(name)
        rows = [s for s in views.subject_rows(service, name) if s.key == key]
        if not rows:
            raise NotFound(f"dataset {name} has no subject {key[:16]}")
        error = None
        try:
            count = len(previews.slices(ds, key))
        except PreviewError as exc:
            count, error = 0, str(exc)
        service.audit.append(
            "console.preview_viewed",
            actor=actor_of(admin.user),
            details={"dataset": name, "subject_key": key},
        )
        return page(
            request, "preview.html", admin, dataset=name, subject=rows[0], slices=range(count), error=error
        )

    @app.get("/datasets/{name}/subjects/{key}/slices/{index}.png")
    def preview_slice(name: str, key: str, index: int, admin: SessionInfo = Admin) -> Response:
        ds = dataset_config(name)
        try:
            pngs = previews.slices(ds, key)
        except PreviewError as exc:
            raise NotFound(str(exc)) from None
        if not 0 <= index < len(pngs):
            raise NotFound(f"no slice {index}")
        return Response(pngs[index], media_type="image/png")

    @app.get("/plans", response_class=HTMLResponse)
    def plans(request: Request, admin: SessionInfo = Admin, done: str = "") -> Response:
        return page(request, "plans.html", admin, p=views.plans(service), done=done, error=None)

    def plans_error(request: Request, admin: SessionInfo, message: str) -> Response:
        return page(request, "plans.html", admin, 400, p=views.plans(service), done="", error=message)

    @app.post("/plans/approve")
    def approve(
        request: Request,
        admin: SessionInfo = Admin,
        csrf_token: str = Form(""),
        plan_hash: str = Form(""),
        expires: str = Form(""),
        note: str = Form(""),
    ) -> Response:
        require_csrf(request, admin, csrf_token)
        try:
            digest = check_plan_hash(plan_hash)
            expires_at = parse_expiry(expires) if expires.strip() else None
            approve_plan(service.db, service.audit, digest, actor_of(admin.user), expires_at, note.strip())
        except ApprovalError as exc:
            return plans_error(request, admin, str(exc))
        return RedirectResponse(f"/plans?done={quote('approved ' + digest)}", status_code=303)

    @app.post("/plans/revoke")
    def revoke(
        request: Request, admin: SessionInfo = Admin, csrf_token: str = Form(""), plan_hash: str = Form("")
    ) -> Response:
        require_csrf(request, admin, csrf_token)
        try:
            digest = check_plan_hash(plan_hash)
            revoke_approval(service.db, service.audit, digest, actor_of(admin.user))
        except ApprovalError as exc:
            return plans_error(request, admin, str(exc))
        return RedirectResponse(f"/plans?done={quote('revoked ' + digest)}", status_code=303)

    @app.get("/rounds", response_class=HTMLResponse)
    def rounds(request: Request, admin: SessionInfo = Admin) -> Response:
        jobs = [views.job_row(j) for j in views.recent_jobs(service)]
        live = any(j["live"] for j in jobs)
        return page(request, "rounds.html", admin, jobs=jobs, refresh=REFRESH_SECONDS if live else None)

    @app.get("/rounds/{kind}/{round_id}", response_class=HTMLResponse)
    def round_detail(request: Request, kind: str, round_id: str, admin: SessionInfo = Admin) -> Response:
        if kind not in (JobKind.TRAIN.value, JobKind.EVALUATE.value):
            raise NotFound(f"no job kind {kind!r} (train or evaluate)")
        job = service.get_round(round_id) if kind == JobKind.TRAIN.value else service.get_evaluation(round_id)
        row = views.job_row(job)
        return page(
            request,
            "round.html",
            admin,
            job=row,
            events=views.round_events(service, round_id),
            refresh=REFRESH_SECONDS if row["live"] else None,
        )

    @app.get("/egress", response_class=HTMLResponse)
    def egress(request: Request, admin: SessionInfo = Admin) -> Response:
        return page(request, "egress.html", admin, releases=views.egress(service))

    def audit_page(request: Request, admin: SessionInfo, action: str, verify: Any = None) -> Response:
        actions = service.audit.actions()
        chosen = action if action in actions else ""
        return page(
            request,
            "audit.html",
            admin,
            actions=actions,
            action=chosen,
            events=views.audit_events(service, chosen or None),
            verify=verify,
        )

    @app.get("/audit", response_class=HTMLResponse)
    def audit(request: Request, admin: SessionInfo = Admin, action: str = "") -> Response:
        return audit_page(request, admin, action)

    @app.post("/audit/verify", response_class=HTMLResponse)
    def audit_verify(
        request: Request, admin: SessionInfo = Admin, csrf_token: str = Form(""), action: str = Form("")
    ) -> Response:
        require_csrf(request, admin, csrf_token)
        report = service.verify_audit()
        service.audit.append(
            "console.audit_verified",
            actor=actor_of(admin.user),
            details={
                "ok": report.ok,
                "events": report.count,
                "head_id": report.last_id,
                "head": report.head_hash,
            },
        )
        result = {
            "ok": report.ok,
            "summary": report.summary(),
            "count": report.count,
            "anchor": f"{report.last_id}:{report.head_hash}",
        }
        return audit_page(request, admin, action, result)

    if views.privacy_ledger(service) is not None:

        @app.get("/privacy", response_class=HTMLResponse)
        def privacy(request: Request, admin: SessionInfo = Admin) -> Response:
            return page(request, "privacy.html", admin, budgets=views.privacy(service))

    return app

"""Login and bind-address helpers for the web app (standard library only).

The secret from MELANOMA_AUTH is never logged, printed or put in an error message.
"""

from __future__ import annotations

import base64
import binascii
import contextvars
import hmac
import ipaddress
import logging
import math
import os
import threading
import time
from collections import OrderedDict, deque
from typing import Callable

from melanoma_detector.errors import UserError

log = logging.getLogger(__name__)

AUTH_ENV = "MELANOMA_AUTH"


def parse_auth(text: str) -> tuple[str, str]:
    """'user:password' -> (user, password); the password may contain ':'."""
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise UserError(f"{AUTH_ENV} must look like user:password (both non-empty); its value is not shown")
    return user, password


def auth_from_env() -> tuple[str, str] | None:
    """(user, password) from $MELANOMA_AUTH, or None when it is unset or empty."""
    text = os.environ.get(AUTH_ENV, "")
    return parse_auth(text) if text else None


def check_basic_auth(header: str | None, credentials: tuple[str, str]) -> bool:
    """True when an `Authorization: Basic ...` header carries exactly these credentials
    (constant-time comparison)."""
    if not header:
        return False
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "basic" or not token:
        return False
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return False
    user, sep, password = decoded.partition(":")
    if not sep:
        return False
    return credentials_match(user, password, credentials)


def credentials_match(user: str, password: str, credentials: tuple[str, str]) -> bool:
    """True when (user, password) are exactly these credentials; both are always compared, in constant time."""
    ok_user = hmac.compare_digest(user.encode(), credentials[0].encode())
    ok_password = hmac.compare_digest(password.encode(), credentials[1].encode())
    return ok_user and ok_password


class LoginLocked(Exception):
    """Raised instead of checking a password while the client (or every client) is locked out."""

    def __init__(self, retry_after: int):
        super().__init__(f"too many failed logins; try again in {retry_after} s")
        self.retry_after = retry_after


class _Client:
    __slots__ = ("failures", "locked_until")

    def __init__(self):
        self.failures: deque[float] = deque()
        self.locked_until = 0.0


class LoginThrottle:
    """Failed-login limiter shared by the page's login form and the REST API's basic auth (thread-safe).

    `max_failures` failed logins from one client within `window_s` lock that client out for `lockout_s`;
    `global_max_failures` failed logins from all clients together within `window_s` lock every client out for
    `lockout_s` (a distributed guess). A successful login clears the client's own count. At most `max_clients`
    clients are tracked: idle ones are forgotten first, then the least recently failing. A client is an IPv4
    address or an IPv6 /64 (one host usually holds a whole /64). `clock` is monotonic seconds (tests inject one).
    """

    def __init__(self, *, max_failures: int = 5, window_s: float = 300.0, lockout_s: float = 300.0,
                 global_max_failures: int = 100, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if min(max_failures, global_max_failures, max_clients) < 1 or min(window_s, lockout_s) <= 0:
            raise ValueError("LoginThrottle: limits must be positive")
        self.max_failures, self.window_s, self.lockout_s = int(max_failures), float(window_s), float(lockout_s)
        self.global_max_failures, self.max_clients, self.clock = int(global_max_failures), int(max_clients), clock
        self._lock = threading.Lock()
        self._clients: OrderedDict[str, _Client] = OrderedDict()  # least recently failing first
        self._global: deque[float] = deque()
        self._global_until = 0.0

    @property
    def tracked_clients(self) -> int:
        """How many clients the table holds now (at most `max_clients`)."""
        return len(self._clients)

    def retry_after(self, client: str | None) -> int | None:
        """Whole seconds until `client` may try a password again, or None when it may now."""
        key = client_key(client)
        with self._lock:
            now = self.clock()
            entry = self._clients.get(key)
            until = max(self._global_until, entry.locked_until if entry else 0.0)
            if entry is not None and 0 < entry.locked_until <= now:
                del self._clients[key]  # lockout over: a fresh count
        return max(1, math.ceil(until - now)) if until > now else None

    def failure(self, client: str | None) -> None:
        key = client_key(client)
        with self._lock:
            now = self.clock()
            entry = self._clients.pop(key, None) or _Client()
            self._forget_idle(now)
            self._clients[key] = entry  # most recent last
            _expire(entry.failures, now - self.window_s)
            entry.failures.append(now)
            if len(entry.failures) >= self.max_failures:
                entry.failures.clear()
                entry.locked_until = now + self.lockout_s
                log.warning("login throttled: %d failed logins from %s within %g s; its logins are refused for %g s",
                            self.max_failures, key, self.window_s, self.lockout_s)
            _expire(self._global, now - self.window_s)
            self._global.append(now)
            if len(self._global) >= self.global_max_failures:
                self._global.clear()
                self._global_until = now + self.lockout_s
                log.warning("login throttled: %d failed logins from all clients within %g s; every login is "
                            "refused for %g s", self.global_max_failures, self.window_s, self.lockout_s)

    def success(self, client: str | None) -> None:
        with self._lock:
            self._clients.pop(client_key(client), None)

    def attempt(self, client: str | None, check: Callable[[], bool]) -> bool:
        """Run the password `check` for `client` and count its result; raises LoginLocked, without
        running `check`, while the client is locked out (so a right guess then does not get in)."""
        wait = self.retry_after(client)
        if wait is not None:
            raise LoginLocked(wait)
        ok = bool(check())
        (self.success if ok else self.failure)(client)
        return ok

    def _forget_idle(self, now: float) -> None:
        """Caller holds the lock. Drops idle clients from the front, then the oldest while the table is full."""
        while self._clients:
            key, entry = next(iter(self._clients.items()))
            idle = entry.locked_until <= now and (not entry.failures or entry.failures[-1] <= now - self.window_s)
            if not idle and len(self._clients) < self.max_clients:
                break
            del self._clients[key]


def _expire(times: deque[float], cutoff: float) -> None:
    while times and times[0] <= cutoff:
        times.popleft()


def client_key(host: str | None) -> str:
    """The throttle's key for a client address: IPv4 as is, IPv6 by its /64, anything else as given."""
    if not host:
        return "unknown"
    try:
        ip = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return host[:100]
    if ip.version == 6:
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.ip_network(f"{ip}/64", strict=False))
    return str(ip)


_CLIENT_HOST: contextvars.ContextVar[str | None] = contextvars.ContextVar("melanoma_client_host", default=None)


def current_client_host() -> str | None:
    """The ASGI client address of the request being served (set by RequestGuard), for code such as Gradio's
    `auth=` callable that is not handed the request. Behind a reverse proxy it is the proxy's address unless
    uvicorn trusts that proxy's X-Forwarded-For (its --forwarded-allow-ips / $FORWARDED_ALLOW_IPS)."""
    return _CLIENT_HOST.get()


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 and 'localhost' are loopback; anything else (0.0.0.0, a LAN address, a
    hostname) is reachable from other machines."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def exposure_warnings(host: str, *, share: bool, login: bool) -> list[str]:
    """Warnings to print before serving: a non-loopback bind or a public share link, especially
    without a login. They never include the credentials."""
    notes = []
    if not is_loopback(host):
        notes.append(
            f"warning: --host {host} is not a loopback address: other machines on the network can reach this app"
            + ("" if login else f"; set {AUTH_ENV}=user:password to require a login")
        )
    if share:
        notes.append(
            "warning: --share publishes this app on a public gradio.live link; anyone with the link can upload images"
            + ("" if login else f" (no login: set {AUTH_ENV}=user:password)")
        )
    return notes


LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1", "[::1]")


# A response that stays open for the life of a page and that Gradio serves without a login: its session
# heartbeat. (Its event stream, /gradio_api/queue/data, lasts one prediction and needs the login.)
STREAM_PATHS = ("/gradio_api/heartbeat/",)
# A page (or a gradio_client) holds one; a few tabs of one user fit, one address cannot take the 128 slots. Users
# behind one NAT or an untrusted proxy share an address, and so these 16.
STREAMS_PER_CLIENT = 16


class RequestGuard:
    """Pure ASGI middleware in front of the whole app (REST, Gradio page and its API alike):

    - a request body over `max_body` bytes is refused with 413 when it says so in Content-Length, and cut off
      (the app sees the client disconnect) when it streams past it, so no route reads it into memory;
    - with `allowed_hosts`, a request for another Host is refused (400): a loopback app must not answer a
      web page that points a DNS name of its own at 127.0.0.1 (DNS rebinding);
    - every response says `nosniff`, files served from Gradio's cache (uploads, heatmaps) are never cached
      by a proxy, and, unless `allow_framing` (Hugging Face Spaces shows the app in a frame), no page of
      this app can be framed by another site;
    - the client's address is published to `current_client_host()` for the login throttle;
    - the connection that never ends (Gradio's session heartbeat) is capped per client address, and with a
      login (`session_check`) it needs a logged-in session, which Gradio itself does not ask for: otherwise
      anyone could hold every one of the server's connection slots;
    - its own refusals under /api/ are the REST API's JSON errors.
    """

    def __init__(self, app, *, max_body: int, allowed_hosts: tuple[str, ...] | None = None,
                 allow_framing: bool = False, session_check: Callable[[dict[str, str]], bool] | None = None,
                 max_streams_per_client: int = STREAMS_PER_CLIENT):
        self.app, self.max_body, self.allow_framing = app, int(max_body), allow_framing
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}
        self.session_check, self.max_streams = session_check, int(max_streams_per_client)
        self.streams: dict[str, int] = {}  # open long-lived responses per client key (the event loop's thread only)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        path = scope.get("path", "")
        api = path.startswith("/api/")
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await _refuse(send, 400, "unknown Host; this app answers only for the address it is served on", api)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _refuse(send, 413, "request body too large", api)
        stream = path.startswith(STREAM_PATHS)
        if stream and self.session_check is not None and not self.session_check(_cookies(headers.get("cookie", ""))):
            return await _refuse(send, 401, "login required", api)
        key = client_key((scope.get("client") or (None, None))[0]) if stream else None
        if key is not None:
            if self.streams.get(key, 0) >= self.max_streams:
                return await _refuse(send, 429, f"too many open connections from this address (at most "
                                                f"{self.max_streams}); close other tabs of this app", api)
            self.streams[key] = self.streams.get(key, 0) + 1
        received = 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_body:
                    return {"type": "http.disconnect"}
            return message

        file_route = "/file=" in scope.get("path", "")

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = [(b"x-content-type-options", b"nosniff")]
                if not self.allow_framing:
                    extra += [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'")]
                if file_route:
                    extra.append((b"cache-control", b"no-store"))
                own = [(k, v) for k, v in message.get("headers", [])
                       if not (file_route and k.lower() == b"cache-control")]  # a patient's image: never cached
                names = {k.lower() for k, _ in own}
                message = {**message, "headers": [*own, *[(k, v) for k, v in extra if k not in names]]}
            await send(message)

        token = _CLIENT_HOST.set((scope.get("client") or (None, None))[0])
        try:
            return await self.app(scope, limited_receive, send_with_headers)
        finally:
            _CLIENT_HOST.reset(token)
            if key is not None:
                self.streams[key] -= 1
                if not self.streams[key]:
                    del self.streams[key]


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:7860
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


def _cookies(header: str) -> dict[str, str]:
    # Starlette's lenient parser, as Gradio reads its own cookie: SimpleCookie drops the whole header at one
    # malformed cookie, which another app on localhost (browsers share cookies across ports) can set.
    from starlette.requests import cookie_parser

    return cookie_parser(header)


async def _refuse(send, status: int, text: str, api: bool) -> None:
    """A refusal: the REST API's JSON error under /api/, plain text elsewhere."""
    if api:
        import json

        from melanoma_detector import DISCLAIMER

        body, kind = json.dumps({"error": text, "disclaimer": DISCLAIMER}).encode(), b"application/json"
    else:
        body, kind = text.encode(), b"text/plain; charset=utf-8"
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", kind), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

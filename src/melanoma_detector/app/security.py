"""Login and bind-address helpers for the web app (standard library only).

The secret from MELANOMA_AUTH is never logged, printed or put in an error message.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import os
import secrets

from melanoma_detector.errors import UserError

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
    ok_user = secrets.compare_digest(user.encode(), credentials[0].encode())
    ok_password = secrets.compare_digest(password.encode(), credentials[1].encode())
    return ok_user and ok_password


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


class RequestGuard:
    """Pure ASGI middleware in front of the whole app (REST, Gradio page and its API alike):

    - a request body over `max_body` bytes is refused with 413 when it says so in Content-Length, and cut off
      (the app sees the client disconnect) when it streams past it, so no route reads it into memory;
    - with `allowed_hosts`, a request for another Host is refused (400): a loopback app must not answer a
      web page that points a DNS name of its own at 127.0.0.1 (DNS rebinding);
    - every response says `nosniff`, files served from Gradio's cache (uploads, heatmaps) are never cached
      by a proxy, and, unless `allow_framing` (Hugging Face Spaces shows the app in a frame), no page of
      this app can be framed by another site.
    """

    def __init__(self, app, *, max_body: int, allowed_hosts: tuple[str, ...] | None = None,
                 allow_framing: bool = False):
        self.app, self.max_body, self.allow_framing = app, int(max_body), allow_framing
        self.allowed_hosts = None if allowed_hosts is None else {h.lower() for h in allowed_hosts}

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.allowed_hosts is not None and _host_name(headers.get("host", "")) not in self.allowed_hosts:
            return await _plain(send, 400, "unknown Host; this app answers only for the address it is served on")
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_body:
            return await _plain(send, 413, "request body too large")
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

        return await self.app(scope, limited_receive, send_with_headers)


def _host_name(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:7860
        return host[: host.find("]") + 1] if "]" in host else host
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def _plain(send, status: int, text: str) -> None:
    body = text.encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain; charset=utf-8"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

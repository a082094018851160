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

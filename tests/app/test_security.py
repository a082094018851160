"""Login throttling (`melanoma_detector.app.security.LoginThrottle`): through the real app for the page's
login form (Gradio's POST /login) and the REST API's HTTP basic auth, and on its own for the global cap,
the memory bound and the client key. A fake monotonic clock stands in for waiting out a lockout."""

from __future__ import annotations

import logging

import pytest

from melanoma_detector.app.security import LoginLocked, LoginThrottle, client_key

pytestmark = pytest.mark.timeout(300)

USER, PASSWORD = "alice", "s3cret:pw"
ATTACKER, NEIGHBOUR = "203.0.113.5", "198.51.100.7"


class FakeClock:
    def __init__(self, start: float = 1000.0):
        self.now = start

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def login_app(app_predictor, clock):
    """The real app with a login, its throttle on the fake clock (defaults otherwise: 5 in 300 s)."""
    pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
    from melanoma_detector.app import build_app

    return build_app(app_predictor, auth=(USER, PASSWORD), login_throttle=LoginThrottle(clock=clock))


def _client(app, host: str):
    from fastapi.testclient import TestClient

    return TestClient(app, client=(host, 40000))


def _page_login(http, password: str):
    return http.post("/login", data={"username": USER, "password": password})


def test_page_login_locks_out_an_address_after_5_failures_even_for_the_right_password(login_app, clock):
    attacker, neighbour = _client(login_app, ATTACKER), _client(login_app, NEIGHBOUR)
    for _ in range(5):
        assert _page_login(attacker, "guess").status_code == 400  # Gradio's "Incorrect credentials."
    r = _page_login(attacker, PASSWORD)
    assert r.status_code == 429 and r.headers["retry-after"] == "300"
    assert "access-token" not in r.headers.get("set-cookie", "")  # the right guess did not log in
    assert attacker.post("/login/", data={"username": USER, "password": PASSWORD}).status_code == 429
    # the same count guards the REST API
    r = attacker.get("/api/v1/health", auth=(USER, PASSWORD))
    assert r.status_code == 429 and r.headers["retry-after"] == "300" and "disclaimer" in r.json()
    # another address is not blocked
    r = _page_login(neighbour, PASSWORD)
    assert r.status_code == 200 and "access-token" in r.headers["set-cookie"]
    clock.now += 299
    r = _page_login(attacker, PASSWORD)
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    clock.now += 1  # the lockout is over
    r = _page_login(attacker, PASSWORD)
    assert r.status_code == 200 and "access-token" in r.headers["set-cookie"]


def test_rest_basic_auth_is_throttled_and_a_success_resets_the_count(login_app, clock):
    http = _client(login_app, ATTACKER)
    for _ in range(20):  # no credentials at all is not a guess
        assert http.get("/api/v1/health").status_code == 401
    for _ in range(4):
        assert http.get("/api/v1/health", auth=(USER, "guess")).status_code == 401
    assert http.get("/api/v1/health", auth=(USER, PASSWORD)).status_code == 200  # resets the count
    for _ in range(4):
        assert http.get("/api/v1/health", auth=(USER, "guess")).status_code == 401
    assert _page_login(http, PASSWORD).status_code == 200  # a page login resets it too
    for _ in range(4):
        assert http.get("/api/v1/health", auth=(USER, "guess")).status_code == 401
    clock.now += 301  # failures older than the window no longer count
    for _ in range(4):
        assert http.get("/api/v1/health", auth=(USER, "guess")).status_code == 401
    assert http.get("/api/v1/health", auth=(USER, "guess")).status_code == 401  # the 5th in 300 s
    r = http.get("/api/v1/health", auth=(USER, PASSWORD))
    assert r.status_code == 429 and r.headers["retry-after"] == "300"
    r = http.post("/api/v1/predict", files={"file": ("x.jpg", b"abc", "image/jpeg")}, auth=(USER, PASSWORD))
    assert r.status_code == 429


def test_a_lockout_is_logged_once_without_the_password(login_app, caplog):
    http = _client(login_app, ATTACKER)
    caplog.set_level(logging.DEBUG)
    for _ in range(8):
        _page_login(http, "hunter2-guess")
    warnings = [r for r in caplog.records if "login throttled" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert ATTACKER in warnings[0].getMessage()
    assert "hunter2" not in caplog.text and PASSWORD not in caplog.text


def test_a_locked_client_never_reaches_the_password_check(clock):
    throttle = LoginThrottle(max_failures=3, window_s=60, lockout_s=120, clock=clock)
    checked = []

    def wrong():
        checked.append(1)
        return False

    for _ in range(3):
        assert throttle.attempt("10.0.0.1", wrong) is False
    with pytest.raises(LoginLocked) as info:
        throttle.attempt("10.0.0.1", lambda: checked.append("right") or True)
    assert info.value.retry_after == 120 and checked == [1, 1, 1]
    assert throttle.attempt("10.0.0.2", lambda: True) is True
    clock.now += 120
    assert throttle.attempt("10.0.0.1", lambda: True) is True


def test_many_addresses_trip_the_global_cap(clock):
    throttle = LoginThrottle(max_failures=5, global_max_failures=10, window_s=300, lockout_s=300, clock=clock)
    for i in range(10):
        throttle.failure(f"10.0.1.{i}")
    assert throttle.retry_after("10.0.2.1") == 300  # even an address that never failed
    clock.now += 300
    assert throttle.retry_after("10.0.2.1") is None


def test_the_table_of_clients_stays_bounded(clock):
    throttle = LoginThrottle(max_failures=5, global_max_failures=10**9, max_clients=50, clock=clock)
    for i in range(5000):
        throttle.failure(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
        clock.now += 0.001
        assert throttle.tracked_clients <= 50
    assert throttle.tracked_clients == 50
    clock.now += 301  # all idle now: the next failure forgets them
    throttle.failure("192.0.2.1")
    assert throttle.tracked_clients == 1
    for _ in range(4):
        throttle.failure("192.0.2.1")
    assert throttle.retry_after("192.0.2.1") == 300  # its own entry survives the clean-up


def test_client_key_groups_an_ipv6_64_and_unwraps_mapped_ipv4():
    assert client_key("2001:db8:1:2:aaaa::1") == client_key("2001:db8:1:2:bbbb::9") == "2001:db8:1:2::/64"
    assert client_key("2001:db8:1:3::1") != client_key("2001:db8:1:2::1")
    assert client_key("::ffff:203.0.113.5") == client_key("203.0.113.5") == "203.0.113.5"
    assert client_key(None) == client_key("") == "unknown"


# ------------------------------------------------------------------ connections that never end; JSON refusals


def test_the_heartbeat_stream_needs_a_login_when_the_app_has_one(login_app):
    """Gradio's heartbeat asks for no login and never ends: without this anyone could fill every slot."""
    http = _client(login_app, NEIGHBOUR)
    assert http.get("/gradio_api/heartbeat/abc").status_code == 401
    assert http.get("/gradio_api/heartbeat/abc", cookies={"access-token-x": "forged"}).status_code == 401


def test_a_logged_in_session_passes_the_heartbeat_check(login_app):
    from melanoma_detector.app.security import RequestGuard

    http = _client(login_app, NEIGHBOUR)
    assert _page_login(http, PASSWORD).status_code == 200
    guard = login_app.middleware_stack
    while not isinstance(guard, RequestGuard):
        guard = guard.app
    cookie = "; ".join(f"{k}={v}" for k, v in http.cookies.items())
    from melanoma_detector.app.security import _cookies

    assert guard.session_check(_cookies(cookie)) and not guard.session_check(_cookies("access-token-x=forged"))
    # a malformed cookie of another app on localhost (browsers share them across ports) must not hide the session
    for foreign in ('theme={"dark":true}', "pref=a b", "sid=abc\\def"):
        assert guard.session_check(_cookies(f"{foreign}; {cookie}")), foreign
        assert guard.session_check(_cookies(f"{cookie}; {foreign}")), foreign


def test_open_streams_are_capped_per_address_and_released():
    import asyncio

    from melanoma_detector.app.security import RequestGuard

    async def scenario():
        release = asyncio.Event()

        async def endless(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await release.wait()
            await send({"type": "http.response.body", "body": b""})

        guard = RequestGuard(endless, max_body=1000, max_streams_per_client=3)
        statuses: list[int] = []

        async def request(host: str, path: str = "/gradio_api/heartbeat/s1"):
            scope = {"type": "http", "path": path, "headers": [], "client": (host, 1)}

            async def receive():
                return {"type": "http.request", "body": b""}

            async def send(message):
                if message["type"] == "http.response.start":
                    statuses.append(message["status"])

            await guard(scope, receive, send)

        held = [asyncio.create_task(request(ATTACKER)) for _ in range(3)]
        await asyncio.sleep(0.05)
        await asyncio.wait_for(request(ATTACKER), 5)  # the 4th from one address: refused at once
        held.append(asyncio.create_task(request(NEIGHBOUR, "/gradio_api/heartbeat/x")))  # its own count
        await asyncio.sleep(0.05)
        assert statuses == [200, 200, 200, 429, 200]
        release.set()
        await asyncio.gather(*held)
        assert guard.streams == {}  # released when the streams end
        await asyncio.wait_for(request(ATTACKER), 5)
        assert statuses[-1] == 200

    # in a thread of its own: another test's fixture may hold a running event loop in this one
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, scenario()).result(timeout=60)


def test_api_errors_are_json_for_unknown_routes_wrong_methods_and_oversized_bodies(app_predictor):
    pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
    from melanoma_detector.app import build_app

    http = _client(build_app(app_predictor, max_upload_mb=1), NEIGHBOUR)
    r = http.get("/api/v1/predict")
    assert r.status_code == 405 and r.headers["allow"] == "POST" and "disclaimer" in r.json()
    for path in ("/api/v1/nothing", "/api/v1", "/api/other", "/api"):
        r = http.get(path)
        assert r.status_code == 404 and "disclaimer" in r.json() and "/api/v1/predict" in r.json()["error"], path
    assert http.get("/api/v1/docs").status_code == 200  # FastAPI's own docs routes (no login) come first
    r = http.post("/api/v1/predict", content=b"x" * 10, headers={"content-length": str(50 * 2**20),
                                                                  "content-type": "application/octet-stream"})
    assert r.status_code == 413 and "disclaimer" in r.json()
    assert http.get("/api/v1/health").status_code == 200

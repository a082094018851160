"""The web app against hostile requests: server paths through the Gradio API, foreign Host headers, oversized
bodies of any route, framing, non-boolean TTA, other users reading heatmaps, session memory."""

from __future__ import annotations

import json
import os
import shutil
import stat

import pytest

from conftest import EXAMPLE_FILES, serve

pytest.importorskip("gradio", reason="the app extra is not installed (pip install -e '.[app]')")
httpx = pytest.importorskip("httpx")

pytestmark = pytest.mark.timeout(300)


def _call_predict(http, url: str, data: list) -> str:
    """The Gradio API's two-step call; returns the event stream's text."""
    r = http.post(f"{url}/gradio_api/call/predict", json={"data": data})
    assert r.status_code == 200, r.text
    return http.get(f"{url}/gradio_api/call/predict/{r.json()['event_id']}").text


def test_the_gradio_api_never_opens_a_server_path(live_server, tmp_path):
    """Mounted on FastAPI, Gradio skipped its check that an input file was uploaded: an API call naming any
    server path had it copied and scored (another user's image, /etc/passwd; /dev/zero hung the server)."""
    private = tmp_path / "private" / "patient.jpg"
    private.parent.mkdir()
    shutil.copy(EXAMPLE_FILES[0], private)
    with httpx.Client(timeout=60) as http:
        for path in (str(private), "/etc/passwd"):
            events = _call_predict(http, live_server, [{"path": path, "meta": {"_type": "gradio.FileData"}}, False])
            assert "event: error" in events and "Risk level" not in events, events[:500]
        assert http.get(f"{live_server}/api/v1/health").status_code == 200


def test_tta_must_be_a_boolean_in_the_gradio_api(live_server):
    from gradio_client import Client, handle_file
    from gradio_client.exceptions import AppError

    client = Client(live_server, verbose=False)
    try:
        with pytest.raises(AppError, match="true or false"):
            client.predict(handle_file(str(EXAMPLE_FILES[0])), "false", api_name="/predict")
    finally:
        client.close()


def test_any_route_refuses_a_body_over_the_limit_and_pages_cannot_be_framed(live_server):
    with httpx.Client(timeout=60) as http:
        r = http.post(f"{live_server}/gradio_api/queue/join", content=b"{" + b" " * (25 * 1024 * 1024) + b"}",
                      headers={"content-type": "application/json"})
        assert r.status_code == 413
        page = http.get(f"{live_server}/")
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


def test_a_loopback_app_answers_only_loopback_host_names(app_predictor):
    from melanoma_detector.app import build_app
    from melanoma_detector.app.security import LOOPBACK_HOSTS

    app = build_app(app_predictor, auth=False, allowed_hosts=LOOPBACK_HOSTS)
    with serve(app) as url, httpx.Client(timeout=60) as http:
        assert http.get(f"{url}/api/v1/health").status_code == 200
        port = url.rsplit(":", 1)[1]
        for host in ("localhost", f"localhost:{port}", f"[::1]:{port}"):
            assert http.get(f"{url}/api/v1/health", headers={"host": host}).status_code == 200, host
        r = http.get(f"{url}/api/v1/health", headers={"host": f"rebind.attacker.example:{port}"})
        assert r.status_code == 400 and "Host" in r.text


def test_a_heatmap_file_is_private_to_the_server_user(tmp_path):
    from PIL import Image

    from melanoma_detector.app.ui import cache_png

    path = cache_png(Image.new("RGB", (8, 8)), tmp_path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600


def test_a_session_keeps_a_file_path_not_the_image_and_the_slider_still_rerenders(app_predictor, tmp_path):
    from melanoma_detector.app.server import InferenceRunner
    from melanoma_detector.app.ui import build_blocks

    demo = build_blocks(InferenceRunner(app_predictor, workers=1))
    fns = {f.fn.__name__: f.fn for f in demo.fns.values()}
    path = next(p for p in EXAMPLE_FILES if p.name.startswith("malignant"))
    *_, first, state = fns["analyse"](str(path), False)
    assert set(state) == {"display", "cam", "box", "opacity"} and os.path.isfile(state["display"])
    # never an output, so Gradio's cache clean-up has to know the file, or the copy of the upload stays forever
    assert any(state["display"] in getattr(block, "temp_files", ()) for block in demo.blocks.values())
    assert len(json.dumps({k: v for k, v in state.items() if k != "cam"})) < 1000
    again, new_state = fns["rerender"](state, 0.9)
    assert os.path.isfile(again) and again != first and new_state["opacity"] == 0.9

"""`build_app()`: one FastAPI app holding the Gradio page ("/") and a small REST API.

Routes:
  POST /api/v1/predict   multipart field `file` (one image); optional query `tta=true`.
  GET  /api/v1/health    liveness + model version.
  GET  /model-card       the bundle's MODEL_CARD.md, rendered to HTML (`?format=md` for the markdown).
  /                      the Gradio page (its own API under /gradio_api/, `api_name="predict"`).

REST error contract (always JSON `{"error": "...", "disclaimer": "..."}`, never a 5xx for bad input):
  400 not multipart / no `file` field / more than one file / empty file / malformed body / bad `tta`
  401 login required (only when MELANOMA_AUTH or `auth=` is set; HTTP basic, same credentials as the page)
  413 upload larger than `max_upload_mb`
  422 the file is not a decodable image (random bytes, truncated or unsupported format)
  429 too many failed logins from this address (or from all of them); `Retry-After` says when to try again
An image that decodes but that the model's input gate refuses (too small, nearly uniform, not
dermoscopy-like) is a valid request: 200 with `status: "cannot_assess"` and the `reason`.

Uses the torch-free `Predictor` only; the app never imports torch.
"""

import logging
import threading
from pathlib import Path
from typing import Any

from fastapi import Request  # module level: FastAPI resolves route annotations against module globals

from melanoma_detector import DISCLAIMER, __version__
from melanoma_detector.app.security import (
    LoginLocked,
    LoginThrottle,
    auth_from_env,
    check_basic_auth,
    credentials_match,
    current_client_host,
)
from melanoma_detector.errors import UserError

log = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
MODEL_CARD_PATH = "/model-card"
_ENVELOPE_BYTES = 64 * 1024  # multipart headers/boundaries allowed on top of the file itself
_REPO_EXAMPLES = Path(__file__).resolve().parents[3] / "examples"

__all__ = ["API_PREFIX", "MODEL_CARD_PATH", "InferenceRunner", "auth_from_env", "build_app", "resolve_predictor"]


def pin_malloc_mmap_threshold(threshold: int = 128 * 1024) -> bool:
    """Keep glibc returning large freed blocks to the OS; True when set (glibc only).

    glibc raises its mmap threshold to the size of the largest block freed so far (up to 32 MB).
    After a few uploads and decoded images, blocks of that size come from per-thread heaps that keep
    the memory once freed, so the server's RSS kept growing under load (benchmarks/app_load.py,
    docs/benchmarks.md). A fixed threshold (the same as MALLOC_MMAP_THRESHOLD_=131072) keeps
    image-sized buffers in mmap, unmapped on free.
    """
    import ctypes
    import sys

    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    m_mmap_threshold = -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, int(threshold)))


class _UploadTooLarge(Exception):
    """Raised from the request stream once an upload passes the size limit."""


def resolve_predictor(predictor_or_bundle: Any = None):
    """A Predictor as is; a Bundle, a bundle folder or None (the default bundle) -> Predictor."""
    from melanoma_detector.inference.bundle import Bundle, default_bundle_dir
    from melanoma_detector.inference.predictor import Predictor

    if predictor_or_bundle is None:
        predictor_or_bundle = default_bundle_dir()
    if isinstance(predictor_or_bundle, (Predictor,)) or (
        hasattr(predictor_or_bundle, "predict") and hasattr(predictor_or_bundle, "bundle")
    ):
        return predictor_or_bundle
    if isinstance(predictor_or_bundle, (str, Path, Bundle)):
        return Predictor(predictor_or_bundle)
    kind = type(predictor_or_bundle).__name__
    raise TypeError(f"build_app: expected a Predictor, Bundle or bundle folder, got {kind}")


class InferenceRunner:
    """Runs `Predictor.predict` for both the REST API and the Gradio page, at most `workers`
    images at a time (each ONNX Runtime run already uses its own intra-op threads, so more
    concurrent runs would only oversubscribe the CPU)."""

    def __init__(self, predictor, workers: int = 2):
        self.predictor = predictor
        self._slots = threading.BoundedSemaphore(max(1, int(workers)))

    def predict(self, source, **kwargs) -> dict[str, Any]:
        with self._slots:
            return self.predictor.predict(source, **kwargs)

    def predict_upload(self, data: bytes, *, name: str, **kwargs) -> dict[str, Any]:
        """Decode uploaded bytes and predict, in one slot: a decoded image can take hundreds of MB,
        so uploads must not all decode at once (raises ImageDecodeError for a bad file)."""
        from melanoma_detector.data.io import load_image

        with self._slots:
            image = load_image(data, name=name)
            return self.predictor.predict(image, name=name, **kwargs)


def public_result(result: dict[str, Any], *, model_version: str, tta: bool, threshold: float) -> dict[str, Any]:
    """The REST payload: result fields + model version + disclaimer (no arrays, no images)."""
    keys = ("probability_malignant", "predicted_label", "risk_level", "recommendation", "status", "reason")
    out = {k: result.get(k) for k in keys}
    out.update(model_version=model_version, screening_threshold=threshold, tta=tta, disclaimer=DISCLAIMER)
    return out


def _bool_param(text: str | None) -> bool | None:
    if text is None or text == "":
        return False
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    return None


def _render_markdown(text: str) -> str | None:
    try:
        from markdown_it import MarkdownIt
    except ImportError:  # pragma: no cover - markdown-it-py comes with gradio (via rich)
        return None
    # js-default: tables on, raw HTML in the markdown off (escaped), no network look-ups.
    return MarkdownIt("js-default").render(text)


def _model_card_html(body: str, version: str) -> str:
    import html

    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Model card - melanoma-detector {html.escape(version)}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; line-height: 1.5; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: .25rem .5rem; }}
.disclaimer {{ background: #fff4d6; border: 1px solid #f0a500; padding: .75rem 1rem; border-radius: 6px; }}
code, pre {{ background: #f4f4f4; }}
</style></head>
<body><p class="disclaimer"><strong>{html.escape(DISCLAIMER)}</strong></p>
{body}
<p class="disclaimer">{html.escape(DISCLAIMER)}</p></body></html>"""


def build_app(
    predictor_or_bundle: Any = None,
    *,
    max_upload_mb: float = 20,
    auth: tuple[str, str] | None | bool = None,
    examples_dir: str | Path | None = None,
    concurrency: int = 4,
    inference_workers: int = 2,
    allowed_hosts: tuple[str, ...] | None = None,
    allow_framing: bool = False,
    login_throttle: LoginThrottle | None = None,
):
    """Build the FastAPI app with the Gradio page mounted at "/".

    predictor_or_bundle: a `Predictor`, a `Bundle`, a bundle folder, or None for the default
        bundle ($MELANOMA_MODEL, else models/default).
    max_upload_mb: largest accepted upload (REST: 413 above it; the page refuses it too).
    auth: (user, password); None reads $MELANOMA_AUTH ("user:password"); False disables login.
        When set, the page asks for a login and /api/v1/* needs HTTP basic auth.
    examples_dir: sample images shown under the upload (default: the repository's examples/).
    concurrency: Gradio queue workers (`default_concurrency_limit`).
    inference_workers: model runs at once, shared by the page and the REST API.
    allowed_hosts: Host names the app answers (`melanoma serve` passes the loopback names when it binds
        loopback); None answers any.
    allow_framing: let other sites show the page in a frame (Hugging Face Spaces does); otherwise refused.
    login_throttle: the failed-login limiter for the page's login form and the REST API's basic auth
        (default `LoginThrottle()`: 5 failures from one address in 5 minutes lock it out for 5 minutes, 100 from
        all addresses lock everyone out); used only with a login.
    The model card (/model-card) describes the model, not any user's data, and is served without login.
    """
    import anyio
    import gradio as gr
    from fastapi import FastAPI, HTTPException
    from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse
    from starlette.requests import ClientDisconnect

    from melanoma_detector.app.ui import build_blocks
    from melanoma_detector.errors import ImageDecodeError

    if max_upload_mb <= 0:
        raise UserError(f"max_upload_mb must be > 0, got {max_upload_mb}")
    credentials = auth_from_env() if auth is None else (None if auth is False else auth)
    if credentials is not None and (
        not isinstance(credentials, tuple) or len(credentials) != 2 or not all(credentials)
    ):
        raise UserError("auth must be a (user, password) pair of non-empty strings")
    predictor = resolve_predictor(predictor_or_bundle)
    pin_malloc_mmap_threshold()
    runner = InferenceRunner(predictor, workers=inference_workers)
    version = predictor.bundle.version
    threshold = float(predictor.thresholds["screening"])
    max_bytes = int(max_upload_mb * 1024 * 1024)
    examples = Path(examples_dir) if examples_dir is not None else _REPO_EXAMPLES

    app = FastAPI(
        title="melanoma-detector",
        version=__version__,
        description="Benign vs. malignant (melanoma) classification of dermoscopic images. " + DISCLAIMER,
        # behind a login the API's own description is not published either
        docs_url=None if credentials else f"{API_PREFIX}/docs",
        redoc_url=None,
        openapi_url=None if credentials else f"{API_PREFIX}/openapi.json",
    )
    app.state.predictor = predictor
    app.state.runner = runner
    throttle = (LoginThrottle() if login_throttle is None else login_throttle) if credentials else None
    app.state.login_throttle = throttle

    def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": message, "disclaimer": DISCLAIMER}, status_code=status, headers=headers)

    def unauthorized(request: Request) -> JSONResponse | None:
        if credentials is None:
            return None
        header = request.headers.get("authorization")
        try:  # a request without credentials is not a guess: plain 401, not counted
            if header and throttle.attempt(request.client.host if request.client else None,
                                           lambda: check_basic_auth(header, credentials)):
                return None
        except LoginLocked as exc:
            return error(429, str(exc), {"Retry-After": str(exc.retry_after)})
        return error(401, "login required (HTTP basic auth)", {"WWW-Authenticate": 'Basic realm="melanoma-detector"'})

    def gradio_login(username: str, password: str) -> bool:
        """Gradio's POST /login calls this (and nothing else checks a password for the page or its API);
        Gradio answers False with 400 "Incorrect credentials", and the HTTPException here with 429."""
        try:
            return throttle.attempt(current_client_host(), lambda: credentials_match(username, password, credentials))
        except LoginLocked as exc:
            raise HTTPException(429, detail=str(exc), headers={"Retry-After": str(exc.retry_after)}) from None

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception):  # never a stack trace to the client
        log.exception("unhandled error on %s", request.url.path)
        return error(500, "internal error; see the server log")

    @app.get(f"{API_PREFIX}/health")
    async def health(request: Request):
        denied = unauthorized(request)
        if denied:
            return denied
        return {"status": "ok", "model_version": version, "app_version": __version__, "disclaimer": DISCLAIMER}

    @app.post(f"{API_PREFIX}/predict")
    async def predict(request: Request):
        """Multipart upload, field `file`: one JPEG/PNG/BMP/TIFF/WebP dermoscopic image.
        Query `tta=true` averages over the 8 flips/rotations."""
        denied = unauthorized(request)
        if denied:
            return denied
        tta = _bool_param(request.query_params.get("tta"))
        if tta is None:
            return error(400, "query parameter tta must be true or false")
        content_type = request.headers.get("content-type", "")
        if not content_type.lower().startswith("multipart/form-data"):
            return error(400, "send the image as multipart/form-data in the field 'file'")
        limit_text = f"{max_upload_mb:g} MB"
        too_large = error(413, f"upload too large (over {limit_text}); send a smaller image")
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes + _ENVELOPE_BYTES:
            return too_large
        received = 0

        async def limited_receive():
            # The multipart parser reads the body straight from the socket (file parts spool to a
            # temporary file past 1 MB) and stops at the limit, so an upload is never held whole in memory.
            nonlocal received
            message = await request.receive()
            received += len(message.get("body", b""))
            if received > max_bytes + _ENVELOPE_BYTES:
                raise _UploadTooLarge
            return message

        try:
            form = await Request(request.scope, limited_receive).form(max_files=4, max_fields=16)
        except _UploadTooLarge:
            return too_large
        except ClientDisconnect:
            return error(400, "client disconnected during upload")
        except Exception as exc:  # MultiPartException / HTTPException(400) from a malformed body
            detail = getattr(exc, "detail", None) or getattr(exc, "message", None) or type(exc).__name__
            return error(400, f"malformed multipart body ({detail})")
        try:
            uploads = form.getlist("file")
            if not uploads:
                return error(400, "missing multipart field 'file' (one image file)")
            if len(uploads) > 1:
                return error(400, "send one image per request in the field 'file'")
            upload = uploads[0]
            if isinstance(upload, str) or not hasattr(upload, "read"):
                return error(400, "field 'file' must be a file upload, not a text value")
            if upload.size is not None and upload.size > max_bytes:
                return too_large
            data = await upload.read(max_bytes + 1)
            filename = upload.filename or "<upload>"
        finally:
            await form.close()
        if len(data) == 0:
            return error(400, "empty file; send a JPEG, PNG, BMP, TIFF or WebP image")
        if len(data) > max_bytes:
            return too_large
        try:
            result = await anyio.to_thread.run_sync(lambda: runner.predict_upload(data, name=filename, tta=tta))
        except ImageDecodeError as exc:
            return error(422, str(exc))
        return JSONResponse(public_result(result, model_version=version, tta=tta, threshold=threshold),
                            headers={"Cache-Control": "no-store"})

    @app.get(MODEL_CARD_PATH)
    async def model_card(request: Request, format: str = "html"):
        path = predictor.bundle.root / "MODEL_CARD.md"
        if not path.is_file():
            return error(404, f"this bundle ({version}) has no MODEL_CARD.md")
        text = path.read_text(encoding="utf-8")
        accept = request.headers.get("accept", "")
        if format == "md" or ("text/markdown" in accept and "text/html" not in accept):
            return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
        rendered = _render_markdown(text)
        if rendered is None:
            return PlainTextResponse(text, media_type="text/markdown; charset=utf-8")
        return HTMLResponse(_model_card_html(rendered, version))

    api_methods: dict[str, set[str]] = {}
    for route in app.routes:
        if getattr(route, "path", "").startswith(API_PREFIX + "/"):
            api_methods.setdefault(route.path, set()).update(getattr(route, "methods", None) or ())

    # Registered before the page is mounted at "/", which would otherwise answer every other /api request with
    # Gradio's {"detail": "Not Found"}: the REST contract is JSON {"error", "disclaimer"} for every error.
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"]

    @app.api_route("/api", methods=methods, include_in_schema=False)
    @app.api_route("/api/{rest:path}", methods=methods, include_in_schema=False)
    async def _unknown_api_route(request: Request, rest: str = ""):
        allowed = api_methods.get(request.url.path)
        if allowed:
            return error(405, f"{request.method} is not accepted here; accepted: {', '.join(sorted(allowed))}",
                         {"Allow": ", ".join(sorted(allowed))})
        return error(404, f"no such API route: {request.url.path}; accepted: {', '.join(sorted(api_methods))}")

    demo = build_blocks(
        runner,
        examples_dir=examples if examples.is_dir() else None,
        model_card_url="." + MODEL_CARD_PATH,  # relative: works behind a proxy prefix too
        concurrency=concurrency,
    )
    gr.mount_gradio_app(
        app,
        demo,
        path="/",
        auth=gradio_login if credentials else None,
        auth_message="Research software: log in to use the melanoma detector. " + DISCLAIMER,
        allowed_paths=[str(examples)] if examples.is_dir() else None,
        max_file_size=max_bytes,
        ssr_mode=False,
        show_error=False,  # an unexpected error's text can name server paths; gr.Error messages are still shown
    )
    # Gradio refuses an input file that no user uploaded (a server path such as /etc/passwd or /dev/zero in an
    # API call) only once the Blocks count as launched, which mounting on FastAPI never sets.
    demo.has_launched = True
    from melanoma_detector.app.security import RequestGuard

    # Well above the REST route's own limit (a body arrives in pieces of up to a few hundred kB), so that route
    # always sees its limit crossed first and answers a streamed upload with 413, not a cut-off connection.
    session_check = None
    if credentials:
        # Gradio's heartbeat stream asks for no login; the guard asks for the session cookie Gradio's login set.
        pages = next(r.app for r in app.routes if isinstance(getattr(getattr(r, "app", None), "tokens", None), dict))

        def session_check(cookies: dict[str, str]) -> bool:
            return any(cookies.get(f"{name}-{pages.cookie_id}") in pages.tokens
                       for name in ("access-token", "access-token-unsecure"))

    app.add_middleware(RequestGuard, max_body=max_bytes + _ENVELOPE_BYTES + 4 * 2**20, allowed_hosts=allowed_hosts,
                       allow_framing=allow_framing, session_check=session_check)
    return app

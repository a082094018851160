"""The web app: a Gradio page and a small REST API on one FastAPI app, served torch-free.

Importing this package does no work and imports neither FastAPI nor Gradio; `build_app()` builds
everything. Core packages (`inference`, `data`, ...) never import the app.

    from melanoma_detector.app import build_app
    app = build_app("models/default")        # FastAPI: "/" Gradio page, /api/v1/predict, /model-card
    # uvicorn.run(app, host="127.0.0.1", port=7860)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    from fastapi import FastAPI

__all__ = ["auth_from_env", "build_app"]


def build_app(predictor_or_bundle: Any = None, *, max_upload_mb: float = 20, **kwargs: Any) -> FastAPI:
    """See `melanoma_detector.app.server.build_app`."""
    from melanoma_detector.app.server import build_app as _build_app

    return _build_app(predictor_or_bundle, max_upload_mb=max_upload_mb, **kwargs)


def auth_from_env() -> tuple[str, str] | None:
    """See `melanoma_detector.app.server.auth_from_env`."""
    from melanoma_detector.app.server import auth_from_env as _auth_from_env

    return _auth_from_env()

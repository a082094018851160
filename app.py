"""Entry point for Hugging Face Spaces (README front matter: `sdk: gradio`, `app_file: app.py`).

Builds the web app (Gradio page at "/", REST API at /api/v1/predict, model card at /model-card) on
the bundle in $MELANOMA_MODEL or models/default, and serves it with uvicorn: on 0.0.0.0:7860 inside
a Space (SPACE_ID is set), else on 127.0.0.1:7860. Login: MELANOMA_AUTH=user:password (a Space
secret). Locally, `melanoma serve` does the same with more options.

Research software, not a medical device: its output is not a diagnosis.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path


def main() -> None:
    try:
        import melanoma_detector  # noqa: F401
    except ImportError:  # a Space runs from a plain checkout: use the package from src/
        sys.path.insert(0, str(Path(__file__).resolve().parent / "src"))

    import uvicorn

    from melanoma_detector import DISCLAIMER
    from melanoma_detector.app import build_app

    in_space = bool(os.environ.get("SPACE_ID"))
    host = "0.0.0.0" if in_space else "127.0.0.1"
    port = int(os.environ.get("GRADIO_SERVER_PORT") or os.environ.get("PORT") or 7860)
    from melanoma_detector.app.security import LOOPBACK_HOSTS
    from melanoma_detector.cli import SERVER_LIMITS

    # login from MELANOMA_AUTH when set; a Space shows the app in a frame on huggingface.co
    app = build_app(allow_framing=in_space, allowed_hosts=None if in_space else LOOPBACK_HOSTS)
    print(f"serving on http://{host}:{port}/  {DISCLAIMER}", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5, **SERVER_LIMITS)


if __name__ == "__main__":
    main()

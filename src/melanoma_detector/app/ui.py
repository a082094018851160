"""The Gradio page (Blocks): upload or pick a sample image, get calibrated probabilities, a colour-coded
risk level, the recommendation and a Grad-CAM overlay whose opacity can be changed without
re-running the model. The disclaimer and a link to the model card are always on the page.

Gradio API: `api_name="predict"`, inputs (image, tta) -> (probabilities, risk HTML, recommendation
markdown, heatmap overlay image). Everything is built inside `build_blocks()`.
"""

from __future__ import annotations

import hashlib
import html
import io
import os
from pathlib import Path
from typing import Any

from melanoma_detector import DISCLAIMER
from melanoma_detector.fileio import atomic_path

DEFAULT_OPACITY = 0.45
DISPLAY_MAX_SIDE = 768  # the overlay is re-rendered on this copy when the slider moves
_CACHE_SALT = os.urandom(16)

RISK_STYLES = {  # text colour, background, border
    "Low": ("#1b5e20", "#e8f5e9", "#2e7d32"),
    "Moderate": ("#7a4f00", "#fff4d6", "#f0a500"),
    "High": ("#8b0000", "#fde7e9", "#d32f2f"),
}
_NEUTRAL = ("#37474f", "#eceff1", "#90a4ae")

WHAT_TO_DO = (
    "Upload the original, in-focus dermoscopic photo of a single lesion (JPEG, PNG, BMP, TIFF or WebP, "
    "at least {min_side} px on each side), not a thumbnail, screenshot or ordinary photo. "
    "Whatever this tool says, have any lesion that worries you examined by a clinician."
)


def risk_html(result: dict[str, Any], *, threshold: float, version: str, tta: bool) -> str:
    """The coloured risk panel (green Low / amber Moderate / red High), or the Cannot-assess panel."""
    if result.get("status") != "ok":
        fg, bg, border = _NEUTRAL
        reason = html.escape(result.get("reason") or "unknown reason")
        return (
            f'<div class="risk-panel" data-status="cannot_assess" style="color:{fg};background:{bg};'
            f'border:2px solid {border};border-radius:8px;padding:12px 16px">'
            f'<div style="font-size:1.4em;font-weight:700">Cannot assess this image</div>'
            f"<div><strong>Reason:</strong> {reason}</div></div>"
        )
    level = result.get("risk_level") or "Low"
    fg, bg, border = RISK_STYLES.get(level, _NEUTRAL)
    p = float(result["probability_malignant"])
    label = html.escape(str(result.get("predicted_label")))
    return (
        f'<div class="risk-panel" data-status="ok" data-level="{html.escape(level)}" style="color:{fg};'
        f'background:{bg};border:2px solid {border};border-radius:8px;padding:12px 16px">'
        f'<div style="font-size:1.6em;font-weight:700">Risk level: {html.escape(level)}</div>'
        f"<div>Calibrated probability of melanoma: <strong>{p:.1%}</strong>; flagged <strong>{label}</strong> "
        f"at the screening threshold {threshold:.1%}.</div>"
        f'<div style="font-size:.85em;opacity:.8">Model {html.escape(version)}'
        f'{" - test-time augmentation" if tta else ""}</div>'
        "</div>"
    )


def recommendation_md(result: dict[str, Any], *, min_side: int) -> str:
    if result.get("status") != "ok":
        return f"**What to do:** {WHAT_TO_DO.format(min_side=min_side)}\n\n_{DISCLAIMER}_"
    return f"**Recommendation:** {result.get('recommendation') or ''}\n\n_{DISCLAIMER}_"


def probabilities(result: dict[str, Any]) -> dict[str, float] | None:
    if result.get("status") != "ok":
        return None
    p = float(result["probability_malignant"])
    return {"malignant": p, "benign": 1.0 - p}


def _display_copy(img):
    from PIL import Image

    img = img.convert("RGB")
    if max(img.size) > DISPLAY_MAX_SIDE:
        img = img.copy()
        img.thumbnail((DISPLAY_MAX_SIDE, DISPLAY_MAX_SIDE), Image.Resampling.LANCZOS)
    return img


def cache_png(img, cache_dir: str | Path, *, name: str = "heatmap") -> str:
    """Write `img` as PNG under `cache_dir`/<salted sha256 of the bytes>/`name`.png, once; return the path.

    Handed a PIL image, Gradio rewrites its content-addressed file in place on every render, so a second
    render of the same overlay (the page's chained re-render, or two visitors viewing one sample) truncated
    the file while a browser was still downloading it ("Too much data for declared Content-Length": a
    broken heatmap). Here an existing file is never touched and a new one appears by an atomic rename.
    Inside Gradio's cache folder, Gradio serves the file as it is and its `delete_cache` removes it."""
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    data = buffer.getvalue()
    # salted per process, like Gradio's own cache names: a path reveals nothing about the image
    folder = Path(cache_dir) / hashlib.sha256(_CACHE_SALT + data).hexdigest()
    target = folder / f"{name}.png"
    if not target.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with atomic_path(target) as tmp:
            tmp.write_bytes(data)
            os.chmod(tmp, 0o600)  # a lesion photo: not readable by the machine's other users
    return str(target.resolve())


def _pass_upload_path_unopened(image) -> None:
    """gr.Image opens every upload with Pillow before the event handler runs, so an empty, corrupt
    or bomb file became a raw traceback naming the server's temp folder. Hand the uploaded file's
    path to the app's decoder unopened instead: it answers "Cannot assess" and a one-line reason.
    (Patched on the instance: a gr.Image subclass would make Gradio write a .pyi stub into this
    package at import time.)"""
    import gradio as gr

    original = image.preprocess

    def preprocess(payload):
        if payload is not None and payload.path and not (payload.url or "").startswith("data:"):
            return str(payload.path)
        try:  # a pasted (base64) image: only Gradio can turn it into a file
            return original(payload)
        except Exception:  # noqa: BLE001 - whatever Gradio's decoder raised, the user gets one line
            raise gr.Error("could not read the pasted image; upload a JPEG, PNG, BMP, TIFF or WebP file") from None

    image.preprocess = preprocess


def build_blocks(runner, *, examples_dir: Path | None = None, model_card_url: str = "./model-card",
                 concurrency: int = 4, max_queue: int = 64):
    """The Gradio Blocks for `runner` (an InferenceRunner: `.predictor`, `.predict(...)`)."""
    import gradio as gr

    from melanoma_detector.inference.predictor import overlay_heatmap

    predictor = runner.predictor
    version = predictor.bundle.version
    threshold = float(predictor.thresholds["screening"])
    min_side = int(getattr(predictor, "min_side", 64))
    empty = (None, "", "", None, None)

    def analyse(image_path: str | None, tta: bool):
        if not image_path:
            raise gr.Error("Upload a dermoscopic image first (JPEG, PNG, BMP, TIFF or WebP).")
        if not isinstance(tta, bool):  # the API's "false" is a non-empty string, truthy to bool()
            raise gr.Error("test-time augmentation must be true or false")
        result = runner.predict(image_path, tta=bool(tta), heatmap=True, name=Path(image_path).name)
        panel = risk_html(result, threshold=threshold, version=version, tta=bool(tta))
        text = recommendation_md(result, min_side=min_side)
        if result.get("status") != "ok" or "heatmap" not in result:
            return probabilities(result), panel, text, None, None
        display = _display_copy(result.pop("image"))
        cam, box = result["heatmap"], tuple(result["heatmap_box"])
        rendered = render(display, cam, box, DEFAULT_OPACITY)
        # A session keeps the display image as a file in Gradio's cache, not in memory: thousands of
        # visitors' sessions held 1.8 MB each until they expired.
        shown = cache_png(display, overlay.GRADIO_CACHE, name="display")
        overlay.temp_files.add(shown)  # never an output, so Gradio's delete_cache must be told about it
        return probabilities(result), panel, text, rendered, {"display": shown, "cam": cam, "box": box,
                                                               "opacity": DEFAULT_OPACITY}

    def analyse_if_image(image_path: str | None, tta: bool):
        return analyse(image_path, tta) if image_path else empty

    def render(display, cam, box, opacity: float) -> str:
        return cache_png(overlay_heatmap(display, cam, opacity=float(opacity), box=box), overlay.GRADIO_CACHE)

    def rerender(state: dict | None, opacity: float):
        # the render chained after every analysis is a no-op unless the slider was moved first
        if not state or float(opacity) == state.get("opacity") or not Path(state["display"]).is_file():
            return gr.skip(), gr.skip()  # (the display file is gone once Gradio's cache expired it)
        from PIL import Image

        with Image.open(state["display"]) as display:
            rendered = render(display.convert("RGB"), state["cam"], state["box"], opacity)
        return rendered, {**state, "opacity": float(opacity)}

    banner = (
        '<div style="background:#fff4d6;border:1px solid #f0a500;border-radius:6px;padding:8px 12px">'
        f"<strong>{html.escape(DISCLAIMER)}</strong> "
        f'<a href="{html.escape(model_card_url)}" target="_blank" rel="noopener">Model card</a> '
        f"(model {html.escape(version)}): what it was trained on, how well it does, and its limits.</div>"
    )
    # delete_cache: uploaded images and rendered overlays are removed from Gradio's temp folder 30 min
    # after creation (checked every 15 min) and when the server stops; sample images are kept.
    with gr.Blocks(title="Melanoma detector (research software)", analytics_enabled=False,
                   delete_cache=(900, 1800)) as demo:
        gr.Markdown("# Melanoma detector\nBenign vs. malignant (melanoma) from a dermoscopic image.")
        gr.HTML(banner, elem_id="disclaimer")
        with gr.Row():
            with gr.Column(scale=1):
                image = gr.Image(type="filepath", image_mode=None, sources=["upload", "clipboard"],
                                 label="Dermoscopic image", elem_id="upload", height=360)
                _pass_upload_path_unopened(image)
                tta = gr.Checkbox(value=False, label="Test-time augmentation (average of 8 flips/rotations; slower)",
                                  elem_id="tta")
                button = gr.Button("Assess", variant="primary", elem_id="assess")
                if examples_dir is not None:
                    files = sorted(str(p) for p in Path(examples_dir).glob("*.jpg"))
                    if files:
                        gr.Examples(examples=[[f] for f in files], inputs=[image], examples_per_page=12,
                                    label="Sample images (HAM10000 test split, CC BY-NC-SA 4.0): click one",
                                    cache_examples=False)
            with gr.Column(scale=1):
                risk = gr.HTML(elem_id="risk-level")
                probs = gr.Label(num_top_classes=2, label="Calibrated probability", show_heading=False,
                                 elem_id="probabilities")
                recommendation = gr.Markdown(elem_id="recommendation")
                overlay = gr.Image(type="pil", interactive=False, label="Grad-CAM: where the model looked",
                                   elem_id="heatmap", height=360, format="png")
                opacity = gr.Slider(0.0, 1.0, value=DEFAULT_OPACITY, step=0.05, label="Heatmap opacity",
                                    elem_id="opacity")
        state = gr.State(None, time_to_live=1800)  # as long as Gradio keeps the files it points to
        gr.HTML(
            f'<p style="font-size:.9em">{html.escape(DISCLAIMER)} '
            f'<a href="{html.escape(model_card_url)}" target="_blank" rel="noopener">Model card</a>.</p>',
            elem_id="footer-disclaimer",
        )

        outputs = [probs, risk, recommendation, overlay, state]
        restyle = {"fn": rerender, "inputs": [state, opacity], "outputs": [overlay, state],
                   "api_visibility": "private", "show_progress": "hidden"}
        button.click(analyse, inputs=[image, tta], outputs=outputs, api_name="predict").then(**restyle)
        for event in (image.change, tta.change):
            event(analyse_if_image, inputs=[image, tta], outputs=outputs, api_visibility="private",
                  trigger_mode="always_last").then(**restyle)
        opacity.change(**restyle, trigger_mode="always_last")
    demo.queue(default_concurrency_limit=max(1, int(concurrency)), max_size=max_queue)
    return demo

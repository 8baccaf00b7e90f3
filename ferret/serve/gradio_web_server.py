"""The Ferret web demo (gradio): refer to regions by drawing, ask, see grounded answers.

    python -m ferret.serve.gradio_web_server --controller http://127.0.0.1:21001 \
        --model-list-mode reload --add_region_feature

Upload an image, pick Point, Box or Sketch, draw on the image and press "Mark region" (a stroke
left unmarked is marked when you send). Each marked region is shown on the "Referred regions"
image and goes into the question at a ``<region>`` placeholder (in order), or is appended to it.
Answers stream in; the boxes they name are drawn with their phrases on the "Grounded answer"
image. The app talks to workers through the controller.

For scripts (gradio_client) the app exposes ``/ask``: (image, question, regions JSON list in the
wire format of ``ferret.serve.protocol``, temperature, top_p, max tokens) -> (answer, image).

With an API key set (``--api-key-file``, ``$FERRET_API_KEY_FILE`` or ``$FERRET_API_KEY``) the page
and every gradio route (``/config``, ``/gradio_api/...``, uploads, files) need a login: any user
name, the key as password (gradio's own authentication; ``gradio_client.Client(url,
auth=("ferret", KEY))`` for scripts). Refusals (bad input, limits, a busy or failed worker) are shown
as errors, never as answers, and never with raw exception text.
"""

from __future__ import annotations

import argparse
import hashlib
import html
import json
import logging
import os
import secrets
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from ferret.processing import REGION_PLACEHOLDER
from ferret.regions import Region, RegionError, format_region, parse_grounding
from ferret.processing import MAX_IMAGE_PIXELS
from ferret.serve.auth import ApiKeyError, add_api_key_arguments, resolve_api_key
from ferret.serve.client import ControllerClient, ServeError
from ferret.serve.drawing import draw_grounding, draw_regions, stroke_mask, stroke_to_region
from ferret.serve.protocol import (
    RequestError,
    ServeLimits,
    _check_header,
    check_region_budget,
    checked_max_new_tokens,
    checked_number,
    encode_image,
    is_finite_number,
    loads_json,
    region_from_json,
    region_to_json,
)

logger = logging.getLogger("ferret.serve.gradio_web_server")

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "assets" / "examples"
REFER_CHOICES = ["Point", "Box", "Sketch"]
TITLE = "Ferret: refer and ground anything anywhere at any granularity"
INSTRUCTIONS = (
    "1. Upload an image (or pick an example). 2. Choose Point, Box or Sketch and draw on the image "
    "(one stroke per region), then press **Mark region**. 3. Ask; write `<region>` where a region "
    "goes (else regions are appended). Boxes in the answer are drawn on the right."
)


class DemoError(ValueError):
    """Something the user can fix (no image, nothing drawn, too many placeholders...)."""


class TurnRefused(DemoError):
    """A question was refused (by the page's checks or the model server); the message says why."""


def one_line(error: BaseException | str, default: str = "refused") -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else default


def for_page(message: str) -> str:
    """A message for the page: gradio renders toasts as HTML, so `<region>` must be escaped."""
    return html.escape(message, quote=False)


# ---------------------------------------------------------------------------------------------
# Session: the image, the regions marked for the next question, and the finished turns.


def new_session() -> dict:
    return {"image_key": None, "image": None, "regions": [], "turns": []}


def _image_key(image: Image.Image) -> str:
    return hashlib.sha1(image.tobytes() + repr(image.size).encode()).hexdigest()


def split_editor(value) -> tuple[Image.Image | None, np.ndarray | None]:
    """ImageEditor value -> (RGB background image, (H, W) bool mask of everything painted)."""
    if value is None:
        return None, None
    if isinstance(value, Image.Image):
        return value.convert("RGB"), None
    background = value.get("background")
    if background is None:
        return None, None
    if isinstance(background, np.ndarray):
        background = Image.fromarray(background)
    if isinstance(background, (str, Path)):
        background = Image.open(background)
    image = background.convert("RGB")
    painted = np.zeros((image.height, image.width), dtype=bool)
    for layer in value.get("layers") or []:
        if isinstance(layer, (str, Path)):
            layer = Image.open(layer)
        painted |= stroke_mask(layer, image.size)
    return image, painted


def sync_image(session: dict, image: Image.Image | None) -> dict:
    """A new image starts a new conversation."""
    if image is None:
        return new_session()
    key = _image_key(image)
    if key != session.get("image_key"):
        session = new_session()
        session.update(image_key=key, image=image)
    return session


def regions_of(items: list[dict], image: Image.Image) -> list[Region]:
    return [region_from_json(item, *image.size) for item in items]


def display_question(question: str, regions: list[Region], width: int, height: int) -> str:
    """The question as the model sees it, with readable region names instead of the token."""
    shown = [f"region{i} {format_region(r, width, height, with_token=False)}" for i, r in enumerate(regions)]
    if REGION_PLACEHOLDER not in question:
        return " ".join([question, *shown])
    pieces = question.split(REGION_PLACEHOLDER)
    out = [pieces[0]]
    for i, piece in enumerate(pieces[1:]):
        out += [shown[i] if i < len(shown) else REGION_PLACEHOLDER, piece]
    return "".join(out)


def regions_summary(session: dict) -> str:
    image = session.get("image")
    if image is None or not session["regions"]:
        return "No region marked."
    lines = []
    for i, region in enumerate(regions_of(session["regions"], image)):
        kind = {"point": "point", "box": "box", "mask": "sketch"}[session["regions"][i]["type"]]
        lines.append(f"- `region{i}` ({kind}): `{format_region(region, *image.size, with_token=False)}`")
    return "\n".join(lines)


def regions_preview(session: dict) -> Image.Image | None:
    image = session.get("image")
    if image is None:
        return None
    return draw_regions(image, regions_of(session["regions"], image))


def mark_stroke(session: dict, editor_value, mode: str) -> dict:
    """Turn the painted stroke into a region of the session (raises DemoError if nothing usable)."""
    image, painted = split_editor(editor_value)
    if image is None:
        raise DemoError("upload an image first")
    session = sync_image(session, image)
    if painted is None or not painted.any():
        raise DemoError("nothing is drawn: draw on the image to mark a region")
    try:
        region = stroke_to_region(mode.lower(), painted)
    except RegionError as error:
        raise DemoError(str(error)) from None
    session = dict(session, regions=[*session["regions"], region_to_json(region)])
    return session


def cleared_editor(session: dict):
    image = session.get("image")
    return None if image is None else {"background": image, "layers": [], "composite": image}


def chat_messages(session: dict, pending: tuple[str, str] | None = None) -> list[dict]:
    messages = []
    for turn in session["turns"]:
        messages += [{"role": "user", "content": turn["shown"]}, {"role": "assistant", "content": turn["answer"]}]
    if pending is not None:
        messages += [{"role": "user", "content": pending[0]}, {"role": "assistant", "content": pending[1]}]
    return messages


def checked_sampling(temperature, top_p, max_tokens, limits: ServeLimits) -> tuple[float, float, int]:
    """The sliders' values (or an API caller's) as numbers within the worker's bounds; DemoError otherwise."""
    try:
        values = {"temperature": temperature, "top_p": top_p}
        t = checked_number(values, "temperature", 0.2, 0.0, 2.0)
        p = checked_number(values, "top_p", 0.7, 0.0, 1.0)
        if is_finite_number(max_tokens) and float(max_tokens).is_integer():
            max_tokens = int(max_tokens)  # a slider may send 24.0
        n = checked_max_new_tokens(max_tokens, limits, "max tokens")
    except RequestError as error:
        raise DemoError(str(error)) from None
    return t, p, n


def check_conversation(session: dict, regions: list, limits: ServeLimits) -> None:
    """Refuse (DemoError) a turn that would exceed the workers' limits, before anything is built."""
    image = session["image"]
    if len(session["turns"]) > limits.max_history_turns:
        raise DemoError(f"this conversation has {len(session['turns'])} turns, over the limit of "
                        f"{limits.max_history_turns}: press Clear to start a new one")
    try:
        check_region_budget([len(t["regions"]) for t in session["turns"]] + [len(regions)], *image.size, limits)
    except RequestError as error:
        raise DemoError(str(error)) from None


def payload_for(session: dict, model: str, question: str, regions: list[dict], temperature, top_p, max_tokens) -> dict:
    image = session["image"]
    return {
        "model": model,
        "image": session.setdefault("image_b64", encode_image(image)),
        "question": question,
        "regions": regions,
        "history": [{"question": t["question"], "regions": t["regions"], "answer": t["answer"]} for t in session["turns"]],
        "temperature": temperature,
        "top_p": top_p,
        "max_new_tokens": max_tokens,
    }


def answer_picture(image: Image.Image, regions: list[dict], answer: str) -> Image.Image:
    """The image with the question's regions (labelled region0...) and the answer's boxes (labelled
    with their phrases)."""
    referred = regions_of(regions, image)
    return draw_grounding(draw_regions(image, referred), parse_grounding(answer, *image.size), len(referred))


def stream_answer(client: ControllerClient, payload: dict):
    """Yield the answer so far; raise ServeError on refusal or an in-band failure."""
    for item in client.stream(payload):
        if item.get("error_code"):
            raise ServeError(item.get("error") or "generation failed")
        yield item.get("text", "")


# ---------------------------------------------------------------------------------------------
# The app


def load_upload(path, limits: ServeLimits) -> Image.Image:
    """An uploaded image file, its size checked from the header before it is decoded."""
    from ferret.processing import ImageLoadError, load_image

    try:
        raw = Path(path).read_bytes() if os.path.getsize(path) <= limits.max_body_bytes else None
    except (OSError, TypeError, ValueError):
        raise DemoError("the image upload could not be read") from None
    if raw is None:
        raise DemoError(f"the image is over the {limits.max_body_bytes / 2**20:g} MiB limit")
    try:
        _check_header(raw, limits.max_image_pixels, "the image")
        return load_image(raw)
    except RequestError as error:
        raise DemoError(str(error)) from None
    except ImageLoadError as error:
        raise DemoError(str(error).splitlines()[0]) from None


def build_demo(controller_url: str, model_list_mode: str = "reload", api_key: str | None = None, concurrency: int = 8,
               limits: ServeLimits = ServeLimits()):
    import gradio as gr

    client = ControllerClient(controller_url, api_key)

    def model_choices() -> list[str]:
        try:
            client.refresh()
            return client.list_models()
        except ServeError as error:
            logger.warning("cannot list models: %s", error)
            return []

    initial_models = model_choices()

    def on_load():
        models = model_choices() if model_list_mode == "reload" else initial_models
        return gr.Dropdown(choices=models, value=models[0] if models else None)

    def on_mark(session, editor_value, mode):
        try:
            if len(session.get("regions") or []) >= limits.max_regions:
                raise DemoError(f"at most {limits.max_regions} regions per question")
            session = mark_stroke(session, editor_value, mode)
        except DemoError as error:
            gr.Warning(for_page(str(error)))
            return session, gr.skip(), regions_summary(session), gr.skip()
        return session, regions_preview(session), regions_summary(session), cleared_editor(session)

    def run_turn(session, model, question, regions, temperature, top_p, max_tokens):
        """Generator of (session, chatbot, output image) while one turn streams; a refusal
        raises gr.Error (shown as an error, the turn is not added to the chat)."""
        image = session["image"]
        try:
            temperature, top_p, max_tokens = checked_sampling(temperature, top_p, max_tokens, limits)
            check_conversation(session, regions, limits)
            shown = display_question(question, regions_of(regions, image), *image.size)
        except (DemoError, RequestError) as error:
            raise TurnRefused(one_line(error)) from None
        payload = payload_for(session, model, question, regions, temperature, top_p, max_tokens)
        text = ""
        try:
            for text in stream_answer(client, payload):
                yield session, chat_messages(session, (shown, text)), gr.skip()
        except ServeError as error:
            yield session, chat_messages(session), gr.skip()  # take the refused turn back out of the chat
            raise TurnRefused(f"the model server refused: {one_line(error, 'no reason')}") from None
        turn = {"question": question, "regions": regions, "answer": text, "shown": shown}
        session = dict(session, turns=[*session["turns"], turn], regions=[])
        yield session, chat_messages(session), answer_picture(image, regions, text)

    def on_send(session, editor_value, mode, model, question, temperature, top_p, max_tokens):
        image, painted = split_editor(editor_value)
        if image is None:
            gr.Warning("upload an image first")
            yield session, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        session = sync_image(session, image)
        if painted is not None and painted.any():  # an unmarked stroke counts as a region
            try:
                session = mark_stroke(session, editor_value, mode)
            except DemoError as error:
                gr.Warning(for_page(str(error)))
                yield session, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
                return
        if not question or not question.strip():
            gr.Warning("type a question")
            yield session, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        if not model:
            gr.Warning("no model is available: is a worker registered with the controller?")
            yield session, gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
            return
        preview, summary = regions_preview(session), regions_summary(session)
        try:
            for session_now, messages, output in run_turn(session, model, question.strip(), session["regions"],
                                                          temperature, top_p, max_tokens):
                yield session_now, messages, output, "", preview, summary, cleared_editor(session_now)
        except TurnRefused as error:
            raise gr.Error(for_page(str(error)), print_exception=False) from None

    def on_regenerate(session, model, temperature, top_p, max_tokens):
        if not session.get("turns"):
            gr.Warning("nothing to regenerate yet")
            yield session, gr.skip(), gr.skip()
            return
        last = session["turns"][-1]
        session = dict(session, turns=session["turns"][:-1])
        try:
            yield from run_turn(session, model, last["question"], last["regions"], temperature, top_p, max_tokens)
        except TurnRefused as error:
            raise gr.Error(for_page(str(error)), print_exception=False) from None

    def on_clear():
        return new_session(), [], None, None, "No region marked.", None, ""

    def api_ask(image, question, regions_json, temperature, top_p, max_tokens):
        """Script entry point: one question about an image; yields (answer so far, grounded image).
        Every refusal is a gr.Error with a one-line reason (never a raw exception)."""
        try:
            yield from _api_ask(image, question, regions_json, temperature, top_p, max_tokens)
        except gr.Error:
            raise
        except (DemoError, RequestError, ServeError) as error:  # a script reads the message as text
            raise gr.Error(one_line(error), print_exception=False) from None
        except Exception:  # noqa: BLE001 - logged here, never shown raw
            logger.exception("/ask failed")
            raise gr.Error("internal error while answering (see the web server's log)", print_exception=False) from None

    def _api_ask(image, question, regions_json, temperature, top_p, max_tokens):
        if image is None:
            raise DemoError("no image given")
        if not isinstance(question, str) or not question.strip():
            raise DemoError("type a question")
        if len(question) > limits.max_body_bytes:
            raise DemoError("the question is too long")
        if regions_json is not None and not isinstance(regions_json, str):
            raise DemoError("regions must be a JSON list (as a string)")
        if len(regions_json or "") > limits.max_body_bytes:
            raise DemoError("the regions are too large")
        regions = loads_json(regions_json or "[]", limits, what="regions")
        if not isinstance(regions, list):
            raise DemoError("regions must be a JSON list")
        checked_sampling(temperature, top_p, max_tokens, limits)
        image = load_upload(image, limits) if not isinstance(image, Image.Image) else image.convert("RGB")
        session = sync_image(new_session(), image)
        check_conversation(session, regions, limits)
        try:
            regions_of(regions, image)
        except RequestError as error:
            raise DemoError(f"invalid regions: {error}") from None
        models = model_choices()
        if not models:
            raise DemoError("no model is available: is a worker registered with the controller?")
        answer, output = "", None
        for session, messages, output_update in run_turn(session, models[0], question, regions, temperature, top_p, max_tokens):
            answer = messages[-1]["content"] if messages else ""
            if isinstance(output_update, Image.Image):
                output = output_update
            yield answer, output

    examples = _example_rows()
    with gr.Blocks(title="Ferret") as demo:
        session = gr.State(new_session())
        gr.Markdown(f"# {TITLE}\n{INSTRUCTIONS}")
        with gr.Row():
            with gr.Column(scale=5):
                editor = gr.ImageEditor(
                    label="Image: draw to refer", type="pil", image_mode="RGBA", sources=("upload", "clipboard"),
                    brush=gr.Brush(colors=["#ff2d55"], default_color="#ff2d55", color_mode="fixed", default_size=8),
                    layers=False, format="png", elem_id="ferret-editor", height=420,
                )
                refer_mode = gr.Radio(REFER_CHOICES, value="Box", label="Referring input type", elem_id="ferret-refer-mode")
                mark = gr.Button("Mark region", elem_id="ferret-mark")
                region_view = gr.Image(label="Referred regions", type="pil", format="png", interactive=False, elem_id="ferret-regions-view")
                region_text = gr.Markdown("No region marked.", elem_id="ferret-regions-text")
            with gr.Column(scale=6):
                model = gr.Dropdown(label="Model", choices=initial_models,
                                    value=initial_models[0] if initial_models else None, elem_id="ferret-model")
                chatbot = gr.Chatbot(label="Ferret", height=360, elem_id="ferret-chatbot")
                question = gr.Textbox(label="Question", placeholder="What is <region>?", elem_id="ferret-question")
                with gr.Row():
                    send = gr.Button("Send", variant="primary", elem_id="ferret-send")
                    regenerate = gr.Button("Regenerate", elem_id="ferret-regenerate")
                    clear = gr.Button("Clear", elem_id="ferret-clear")
                output_image = gr.Image(label="Grounded answer", type="pil", format="png", interactive=False, elem_id="ferret-output")
                with gr.Accordion("Parameters", open=False):
                    temperature = gr.Slider(0.0, 1.0, value=0.2, step=0.05, label="Temperature", elem_id="ferret-temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.7, step=0.05, label="Top P", elem_id="ferret-top-p")
                    max_tokens = gr.Slider(8, 1024, value=256, step=8, label="Max output tokens", elem_id="ferret-max-tokens")
        if examples:
            gr.Examples(examples=examples, inputs=[editor, question], label="Examples")

        with gr.Row(visible=False):
            api_image = gr.File(type="filepath")  # opened by api_ask only after its size check
            api_question = gr.Textbox()
            api_regions = gr.Textbox()
            api_answer = gr.Textbox()
            api_output = gr.Image(type="pil", format="png")
            api_button = gr.Button()
            # Numbers arrive as plain JSON and are checked by api_ask (a slider would echo a
            # 5000-digit value back in its own error message, a Number would overflow on it).
            api_temperature = gr.JSON()
            api_top_p = gr.JSON()
            api_max_tokens = gr.JSON()
        api_button.click(api_ask, [api_image, api_question, api_regions, api_temperature, api_top_p, api_max_tokens],
                         [api_answer, api_output], api_name="ask", concurrency_limit=concurrency)

        demo.load(on_load, None, [model], api_visibility="private")
        mark.click(on_mark, [session, editor, refer_mode], [session, region_view, region_text, editor],
                   api_visibility="private")
        send_inputs = [session, editor, refer_mode, model, question, temperature, top_p, max_tokens]
        send_outputs = [session, chatbot, output_image, question, region_view, region_text, editor]
        send.click(on_send, send_inputs, send_outputs, api_visibility="private", concurrency_limit=concurrency)
        question.submit(on_send, send_inputs, send_outputs, api_visibility="private", concurrency_limit=concurrency)
        regenerate.click(on_regenerate, [session, model, temperature, top_p, max_tokens],
                         [session, chatbot, output_image], api_visibility="private", concurrency_limit=concurrency)
        clear.click(on_clear, None, [session, chatbot, output_image, region_view, region_text, editor, question],
                    api_visibility="private")
    return demo


def _example_rows() -> list[list[str]]:
    """Shipped example images with a referring question each."""
    table = EXAMPLES_DIR / "examples.json"
    if not table.is_file():
        return []
    rows = []
    for entry in json.loads(table.read_text()):
        path = EXAMPLES_DIR / entry["file"]
        if path.is_file():
            # The synthetic world's referring wording: the embedded model answers "Red." to the
            # untrained "What is the object in <region>?" and "A red circle." to this one.
            rows.append([str(path), f"What is the object {REGION_PLACEHOLDER}?"])
    return rows


def password_check(api_key: str):
    """gradio ``auth``: any user name, the API key as password (compared in constant time)."""

    def check(_username: str, password: str) -> bool:
        return isinstance(password, str) and secrets.compare_digest(password.encode(), api_key.encode())

    return check


AUTH_MESSAGE = "This Ferret demo is protected: log in with any user name and the server's API key as password."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ferret.serve.gradio_web_server", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    parser.add_argument("--port", type=int, default=7860)
    parser.add_argument("--controller-url", "--controller", dest="controller_url", default="http://127.0.0.1:21001")
    parser.add_argument("--model-list-mode", choices=("once", "reload"), default="once",
                        help="list models once at start, or on every page load")
    parser.add_argument("--concurrency-count", type=int, default=8)
    parser.add_argument("--add_region_feature", "--add-region-feature", action="store_true",
                        help="accepted for compatibility: drawn regions are always sent as region features")
    add_api_key_arguments(parser, "key of the workers/controller, and the page's login password")
    parser.add_argument("--max-image-pixels", type=int, default=ServeLimits.max_image_pixels,
                        help=f"largest image accepted by the page (default {ServeLimits.max_image_pixels})")
    parser.add_argument("--share", action="store_true", help="gradio share link (off: nothing leaves this machine)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 1 <= args.max_image_pixels <= MAX_IMAGE_PIXELS:
        parser.error(f"--max-image-pixels must be in [1, {MAX_IMAGE_PIXELS}]")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # nothing leaves the machine unasked
    logging.basicConfig(level=logging.INFO, format="%(asctime)s web %(levelname)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        api_key = resolve_api_key(args.api_key, args.api_key_file)
    except ApiKeyError as error:
        print(f"gradio_web_server: {error}", file=sys.stderr)
        return 2
    limits = ServeLimits(max_image_pixels=args.max_image_pixels)
    # gradio decodes the editor's uploads itself: PIL then refuses (DecompressionBombError) any
    # image over the limit before decoding its pixels.
    Image.MAX_IMAGE_PIXELS = max(1, limits.max_image_pixels // 2)
    demo = build_demo(args.controller_url, args.model_list_mode, api_key, args.concurrency_count, limits)
    demo.queue(default_concurrency_limit=args.concurrency_count)
    demo.launch(server_name=args.host, server_port=args.port, share=args.share, **launch_options(limits, api_key))
    return 0


def launch_options(limits: ServeLimits, api_key: str | None) -> dict:
    """``demo.launch`` options that make the page safe: uploads capped at the body limit, no raw
    exception text shown (only gr.Error messages), and the key as login password when set."""
    return dict(show_error=False, footer_links=["api"], allowed_paths=[str(EXAMPLES_DIR)], ssr_mode=False,
                max_file_size=limits.max_body_bytes,
                auth=password_check(api_key) if api_key else None, auth_message=AUTH_MESSAGE)


if __name__ == "__main__":
    raise SystemExit(main())

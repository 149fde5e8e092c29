"""The HTTP ingress: OpenAI-compatible endpoints over the model deployment.

    POST /v1/images/generations   {"prompt", "n", "size", "response_format", "seed", "guidance_scale", "num_inference_steps"}
    POST /v1/images/edits         multipart: image, prompt, n, size, response_format, seed, guidance_scale, num_inference_steps
    POST /v1/chat/completions     {"messages": [{"role": "user", "content": [text, image_url data URI]}], "max_tokens"}
    POST /v1/reconstructions      {"image": base64 or data URI, "response_format"}
    GET  /v1/models, /healthz (always open), /readyz (503 until the model is loaded)

Every rejected request gets a 4xx JSON body in OpenAI's error shape,
{"error": {"message", "type", "param", "code"}}; overload gets 503 with Retry-After. Only
the project's `UserError` (bad input) becomes a 4xx: any other exception is a bug of ours,
answered 500 in the same shape and logged with its traceback (`ray.serve` logger).
"""

import asyncio
import base64
import binascii
import hmac
import json
import logging
import math
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayTaskError

from unilip.config import ConfigError
from unilip.errors import UserError
from unilip.images import ImageError, read_image
from unilip.sampler import MAX_GUIDANCE, MAX_STEPS

SIZES = ("448x448",)  # the model's output size
MAX_N = 4
MAX_PROMPT_CHARS = 4000
MAX_IMAGE_PIXELS = 4096 * 4096
MIN_IMAGE_SIDE = 16
MAX_CHAT_TOKENS = 512

app = FastAPI(title="UniLIP", docs_url=None, redoc_url=None)
log = logging.getLogger("ray.serve")


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str = "invalid_request_error",
    headers: dict | None = None,
) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


@app.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    headers = {503: {"Retry-After": "1"}, 401: {"WWW-Authenticate": "Bearer"}}.get(e.status)
    return error_response(e.status, e.message, e.param, e.code, headers)


@app.exception_handler(Exception)
async def _server_error(request: Request, e: Exception):
    # a bug of ours, not the request's: logged with its traceback, answered 500
    log.error("%s %s failed", request.method, request.url.path, exc_info=e)
    cause = e.cause if isinstance(e, RayTaskError) and e.cause is not None else e  # the replica's own exception
    return error_response(500, f"internal error: {type(cause).__name__}", code="server_error")


@dataclass
class Settings:
    model_name: str
    max_body_bytes: int
    api_key: str | None


def api_key(env: str | None, file: str | None) -> str | None:
    """The bearer token from an environment variable or a file (None: no auth)."""
    if env:
        key = os.environ.get(env)
        if not key:
            raise ConfigError(f"auth is configured with api_key_env={env}, but ${env} is not set")
        return key.strip()
    if file:
        return Path(file).read_text().strip()
    return None


# ---------------------------------------------------------------------------- parsing


def field(data: dict, name: str, kind: type, default=None, lo=None, hi=None, choices=None):
    """A typed, range-checked field of a request (JSON values, or strings from a form)."""
    value = data.get(name, default)
    if value is None:
        return default
    if isinstance(value, str) and kind in (int, float):  # multipart forms carry strings
        try:
            value = kind(value)
        except ValueError:
            raise ApiError(400, f"'{name}' must be a number, got {value!r}", name) from None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be of type {kind.__name__}, got {type(value).__name__}", name)
    if kind is float and not math.isfinite(value):
        raise ApiError(400, f"'{name}' must be a finite number, got {value}", name)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{name}' must be from {lo} to {hi}, got {value}", name)
    if choices is not None and value not in choices:
        raise ApiError(400, f"'{name}' must be one of {list(choices)}, got {value!r}", name)
    return value


def prompt_field(data: dict, name: str = "prompt") -> str:
    prompt = data.get(name)
    if prompt is None:
        raise ApiError(400, f"'{name}' is required", name)
    if not isinstance(prompt, str):
        raise ApiError(400, f"'{name}' must be a string", name)
    if not prompt.strip():
        raise ApiError(400, f"'{name}' is empty", name)
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ApiError(400, f"'{name}' is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}", name)
    return prompt


def sampling_fields(data: dict) -> dict:
    field(data, "size", str, "448x448", choices=SIZES)
    field(data, "response_format", str, "b64_json", choices=("b64_json",))
    return {
        "n": field(data, "n", int, 1, 1, MAX_N),
        "seed": field(data, "seed", int, None, 0, 2**31 - 1),
        "guidance_scale": field(data, "guidance_scale", float, None, 0.0, MAX_GUIDANCE),
        "steps": field(data, "num_inference_steps", int, None, 1, MAX_STEPS),
    }


def decode_image(data: bytes, param: str):
    """Bytes -> RGB PIL image; not an image, truncated, too small or too large -> 400."""
    try:
        return read_image(data, min_side=MIN_IMAGE_SIDE, max_pixels=MAX_IMAGE_PIXELS)
    except ImageError as e:
        raise ApiError(400, f"'{param}': {e}", param) from None


def b64_image(value, param: str, limit: int):
    """A base64 string or data URI -> PIL image."""
    if not isinstance(value, str) or not value:
        raise ApiError(400, f"'{param}' must be a base64 string or a data: URI", param)
    if value.startswith("data:"):
        head, sep, value = value.partition(",")
        if not sep or ";base64" not in head:
            raise ApiError(400, f"'{param}' must be a base64 data: URI (data:image/png;base64,...)", param)
    elif value.startswith(("http://", "https://")):
        raise ApiError(400, f"'{param}': image URLs are not fetched; send a base64 data: URI", param)
    if len(value) > limit:
        raise ApiError(413, f"'{param}' is {len(value)} base64 characters; the limit is {limit}", param, "too_large")
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, f"'{param}' is not valid base64", param) from None
    return decode_image(data, param)


async def body_bytes(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes; the limit is {limit}", code="too_large")
    body = b""
    async for chunk in request.stream():  # also bounds bodies sent without a length
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="too_large")
    return body


async def json_body(request: Request, limit: int) -> dict:
    body = await body_bytes(request, limit)
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"malformed JSON: {e}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "the request body must be a JSON object")
    return data


def images_response(images: list[bytes]) -> dict:
    return {"created": int(time.time()), "data": [{"b64_json": base64.b64encode(b).decode()} for b in images]}


# ----------------------------------------------------------------------------- ingress


@serve.deployment
@serve.ingress(app)
class Api:
    def __init__(
        self,
        model,
        model_name: str,
        max_body_bytes: int,
        api_key_env: str | None = None,
        api_key_file: str | None = None,
    ):
        self.model = model
        self.settings = Settings(model_name, max_body_bytes, api_key(api_key_env, api_key_file))
        self.ready = False

    def _authorize(self, request: Request) -> None:
        """Bearer-token check when a key is configured (health and readiness stay open)."""
        key = self.settings.api_key
        given = request.headers.get("authorization", "")
        if key and not (given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip(), key)):
            raise ApiError(401, "missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key")

    async def _call(self, method: str, *args):
        """Call the model deployment; not loaded -> 503, overload -> 503, bad input -> 400. A
        request whose replica is lost (its node died) runs once more on another: every request
        is a pure function of its inputs and seeds. Lost twice -> 503."""
        from ray.exceptions import ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError

        if not self.ready:  # a replica answers once its model is loaded, or to say why it failed
            status = await self.model.status.remote()
            if not status["ready"]:
                raise ApiError(503, f"the model failed to load: {status['error']}", code="model_not_ready")
            self.ready = True
        try:
            try:
                return await getattr(self.model, method).remote(*args)
            except (RayActorError, ActorUnavailableError):
                return await getattr(self.model, method).remote(*args)
        except (RayActorError, ActorUnavailableError):
            raise ApiError(503, "the model replica was lost; retry shortly", code="replica_lost") from None
        except BackPressureError:
            raise ApiError(503, "the server is at capacity; retry shortly", code="overloaded") from None
        except UserError as e:  # the model's own checks (prompt tokens, reserved tokens)
            raise ApiError(400, str(e).strip().splitlines()[-1]) from None

    async def _images(self, request: dict) -> dict:
        result = await self._call("images", request)
        if "error" in result:
            raise ApiError(400, result["error"], "prompt")
        return images_response(result["images"])

    @app.post("/v1/images/generations")
    async def generations(self, request: Request):
        self._authorize(request)
        data = await json_body(request, self.settings.max_body_bytes)
        return await self._images({"task": "generation", "prompt": prompt_field(data), **sampling_fields(data)})

    @app.post("/v1/images/edits")
    async def edits(self, request: Request):
        self._authorize(request)
        body = await body_bytes(request, self.settings.max_body_bytes)  # bounded before the form is parsed

        async def replay() -> dict:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(max_files=4, max_fields=32)
        except Exception as e:  # not multipart, or malformed
            raise ApiError(400, f"expected a multipart/form-data body: {e}") from None
        upload = form.get("image") or form.get("image[]")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "'image' (a file) is required", "image")
        image = decode_image(await upload.read(), "image")
        data = {k: v for k, v in form.items() if isinstance(v, str)}
        return await self._images(
            {"task": "editing", "prompt": prompt_field(data), "image": image, **sampling_fields(data)}
        )

    @app.post("/v1/reconstructions")
    async def reconstructions(self, request: Request):
        self._authorize(request)
        data = await json_body(request, self.settings.max_body_bytes)
        if "image" not in data:
            raise ApiError(400, "'image' is required", "image")
        image = b64_image(data["image"], "image", self.settings.max_body_bytes)
        field(data, "response_format", str, "b64_json", choices=("b64_json",))
        return images_response([await self._call("reconstruct", image)])

    @app.post("/v1/chat/completions")
    async def chat(self, request: Request):
        self._authorize(request)
        data = await json_body(request, self.settings.max_body_bytes)
        messages = data.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "'messages' must be a non-empty list", "messages")
        last = messages[-1]
        if not isinstance(last, dict) or last.get("role") != "user":
            raise ApiError(400, "the last message must be a user message", "messages")
        content = last.get("content")
        if not isinstance(content, list):
            raise ApiError(400, "the user message needs an image: send content parts with an image_url", "messages")
        texts, images = [], []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image_url" and isinstance(part.get("image_url"), dict):
                images.append(b64_image(part["image_url"].get("url"), "image_url", self.settings.max_body_bytes))
            else:
                raise ApiError(
                    400, "content parts must be {type: text, text} or {type: image_url, image_url: {url}}", "messages"
                )
        if len(images) != 1:
            raise ApiError(400, f"send exactly one image per request, got {len(images)}", "messages")
        question = prompt_field({"text": "\n".join(texts)}, "text")
        max_tokens = field(data, "max_tokens", int, 64, 1, MAX_CHAT_TOKENS)
        answer = await self._call("understand", images[0], question, max_tokens)
        return {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.settings.model_name,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": answer}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0},
        }

    @app.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        return {
            "object": "list",
            "data": [{"id": self.settings.model_name, "object": "model", "owned_by": "unilip", "created": 0}],
        }

    @app.get("/healthz")
    async def healthz(self):
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(self):
        try:  # no replica up (all lost, or the first still loading): a handle call would wait for one
            status = await asyncio.wait_for(self.model.status.remote(), timeout=3)
        except TimeoutError:
            status = {"ready": False, "error": None, "reason": "no model replica is up yet"}
        return JSONResponse(status, status_code=200 if status["ready"] else 503)

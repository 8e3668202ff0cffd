"""The HTTP layer: FastAPI routes with typed bodies over an `OpenAIServer`, OpenAI-shaped errors, SSE.

Around the routes, plain ASGI middleware (outermost first): CORS (when origins are configured), the
request id (`X-Request-Id` in, out, and in every log line), the body size limit (413), and API-key auth
(constant-time comparison; every route but /health, the playground page and its files, and /metrics unless
it is public; /docs included). `GET /playground` serves the playground, a static page shipped in the package
(`serving/playground/`) that drives the public streaming API. The same app runs under Ray Serve (the
Ingress builds it around its server) and directly under uvicorn.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from starlette.datastructures import Headers, MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from serving.errors import APIError
from serving.logs import accept_request_id, install, loggable_names, request_id_var
from serving.metrics import PrometheusMetrics
from serving.openai_server import OpenAIServer
from serving.protocol import (
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    ErrorResponse,
    HealthResponse,
    ModelList,
    SessionDeleted,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
)

log = logging.getLogger(__name__)

PLAYGROUND = Path(__file__).with_name("playground")
"""The playground's static files (no build step; nothing is fetched from elsewhere)."""
PLAYGROUND_ASSETS = "/playground/assets"

_ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 429, 500, 503)}
_STREAM = {"text/event-stream": {"schema": {"type": "string"}}}


def _error_response(error: APIError, extra_headers: dict[str, str] | None = None) -> JSONResponse:
    headers = {**error.headers(), **(extra_headers or {})}
    return JSONResponse(error.response().model_dump(), status_code=error.status, headers=headers)


async def _send_error(send: Send, error: APIError, extra_headers: dict[str, str] | None = None) -> None:
    """An error answered from middleware, before the app runs."""
    await _error_response(error, extra_headers)({"type": "http"}, _nothing, send)


async def _nothing() -> Message:
    return {"type": "http.disconnect"}


class RequestIdMiddleware:
    """Takes X-Request-Id (or makes one), sets it for this request's log lines, returns it as a header
    (unless `echo` is off: Ray Serve's proxy already puts the id it passed in on the response)."""

    def __init__(self, app: ASGIApp, echo: bool = True) -> None:
        self.app, self.echo = app, echo

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request_id = accept_request_id(Headers(scope=scope).get("x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        token = request_id_var.set(request_id)

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start" and self.echo:
                MutableHeaders(scope=message)["X-Request-Id"] = request_id
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes with 413, before any of it is parsed (the body is read here, up to
    the limit, and replayed to the app)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        too_large = APIError(413, f"The request body is larger than {self.limit} bytes.", code="body_too_large")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await _send_error(send, too_large)
        parts, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            parts.append(message.get("body", b""))
            size += len(parts[-1])
            if size > self.limit:
                return await _send_error(send, too_large)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(parts), False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: the disconnect, for streaming responses

        await self.app(scope, replay, send)


class AuthMiddleware:
    """Bearer API keys, compared in constant time against every configured key. Paths in `public`, and those
    under the prefixes in `public_prefixes`, need none (they hold no data)."""

    def __init__(
        self, app: ASGIApp, server: OpenAIServer, public: frozenset[str], public_prefixes: tuple[str, ...] = ()
    ) -> None:
        self.app, self.server, self.public, self.public_prefixes = app, server, public, public_prefixes

    def _public(self, path: str) -> bool:
        return path in self.public or path.startswith(self.public_prefixes)

    def _authorised(self, given: bytes) -> bool:
        keys = self.server.api_keys
        if not keys:
            return True
        matches = [hmac.compare_digest(given, key.encode()) for key in keys]  # no early exit
        return any(matches)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            header = Headers(scope=scope).get("authorization", "")
            scheme, _, token = header.partition(" ")
            given = token.strip().encode() if scheme.lower() == "bearer" else b""
            if not self._public(scope["path"]) and not self._authorised(given):
                error = APIError(401, "Incorrect or missing API key.", "authentication_error", code="invalid_api_key")
                return await _send_error(send, error, {"WWW-Authenticate": "Bearer"})
            # The caller's namespace (for its sessions): a hash of its key, never the key; one shared
            # namespace where the server has no keys.
            caller = hashlib.sha256(given).hexdigest()[:32] if self.server.api_keys else ""
            scope.setdefault("state", {})["caller"] = caller
        await self.app(scope, receive, send)


def _validation_error(exc: RequestValidationError) -> APIError:
    first = exc.errors()[0] if exc.errors() else {}
    if first.get("type") == "json_invalid":
        return APIError(400, "The request body is not valid JSON.")
    location = [str(p) for p in first.get("loc", ()) if p != "body" and not isinstance(p, int)]
    param = ".".join(location) or None
    message = str(first.get("msg", "invalid request"))
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    return APIError(400, f"{message} (param: {param})" if param else message, param=param)


UNMATCHED = "unmatched"
"""The metrics label of every request whose path matches no route: a path a client types never becomes a
label (unbounded series, request text in metrics)."""


def route_label(scope: Scope) -> str:
    """The route's path template (e.g. `/v1/chat/completions`) as routing matched it, else `UNMATCHED`."""
    route = scope.get("route")
    return getattr(route, "path", None) or UNMATCHED


def create_app(server: OpenAIServer, behind_serve_proxy: bool = False) -> FastAPI:
    """The FastAPI app around `server`: routes, error handlers and middleware from its settings.

    Behind Ray Serve's proxy, which takes or makes X-Request-Id and returns it itself, the app reads the id
    from the request like anywhere else but does not add the response header a second time."""
    config = server.settings.server
    install()
    app = FastAPI(title="sift-serve", description="OpenAI-compatible API with test-time training (SIFT + LoRA)")
    app.state.server = server

    def count(request: Request, status: int) -> None:
        server.metrics.request(route_label(request.scope), status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        count(request, exc.status)
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return await api_error(request, _validation_error(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = exc.detail if exc.status_code != 400 else "The request body could not be parsed."
        return await api_error(request, APIError(exc.status_code, str(message), kind))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return await api_error(
            request, APIError(500, "The server had an error processing your request.", "server_error")
        )

    async def generate(request: Request, body: ChatCompletionRequest | CompletionRequest, route) -> Response:
        if body.ignored_fields:
            log.warning("ignoring unsupported request fields: %s", loggable_names(body.ignored_fields))
        result = await route(body, request.state.request_id, request.state.caller)
        count(request, 200)
        if isinstance(result, AsyncIterator):
            return StreamingResponse(_guarded(result), media_type="text/event-stream")
        return JSONResponse(result.model_dump(mode="json"))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletionResponse,
        responses={**_ERRORS, 200: {"content": _STREAM}},
    )
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await generate(request, body, server.chat)

    @app.post("/v1/completions", response_model=CompletionResponse, responses={**_ERRORS, 200: {"content": _STREAM}})
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await generate(request, body, server.completion)

    @app.post("/tokenize", response_model=TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        return await server.tokenize(body)

    @app.post("/detokenize", response_model=DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: DetokenizeRequest) -> DetokenizeResponse:
        return await server.detokenize(body)

    @app.delete("/v1/adaptation/sessions/{session_id}", response_model=SessionDeleted, responses=_ERRORS)
    async def delete_session(session_id: str, request: Request) -> SessionDeleted:
        return await server.delete_session(request.state.caller, session_id)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def models() -> ModelList:
        return server.models()

    @app.get("/health", response_model=HealthResponse, responses={503: {"model": HealthResponse}})
    async def health() -> JSONResponse:
        status = await server.health()
        return JSONResponse(status.model_dump(), status_code=200 if status.status == "ok" else 503)

    if isinstance(server.metrics, PrometheusMetrics):  # under Ray Serve, Ray exports the metrics on every node

        @app.get("/metrics", response_class=Response)
        async def metrics() -> Response:
            return Response(server.metrics.exposition(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/playground", response_class=HTMLResponse, include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse((PLAYGROUND / "index.html").read_text())

    app.mount(PLAYGROUND_ASSETS, StaticFiles(directory=PLAYGROUND), name="playground")

    # The playground's page and files hold no data: its API calls carry the key a person types into it.
    public = frozenset({"/health", "/playground"} | ({"/metrics"} if config.metrics_public else set()))
    app.add_middleware(AuthMiddleware, server=server, public=public, public_prefixes=(PLAYGROUND_ASSETS + "/",))
    app.add_middleware(BodyLimitMiddleware, limit=config.max_body_bytes)
    app.add_middleware(RequestIdMiddleware, echo=not behind_serve_proxy)
    if config.cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"], allow_headers=["*"])
    return app


async def _guarded(stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE lines; an error after the first byte becomes an OpenAI-shaped error event, then [DONE]."""
    try:
        async for line in stream:
            yield line
    except APIError as exc:
        yield f"data: {exc.response().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("error while streaming")
        error = APIError(500, "The server had an error while streaming.", "server_error")
        yield f"data: {error.response().model_dump_json()}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        await stream.aclose()  # type: ignore[attr-defined]

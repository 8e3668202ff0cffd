"""The HTTP layer: FastAPI routes over an `OpenAIServer`, errors in OpenAI's shape, SSE streaming.

The routes find the server at `request.app.state.server`, so the same app runs under Ray Serve (the
Ingress deployment sets it) and directly under uvicorn or a test client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError

from serving.openai_server import APIError, OpenAIServer
from serving.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger(__name__)


def _validation_error(exc: ValidationError) -> APIError:
    first = exc.errors()[0]
    param = ".".join(str(p) for p in first.get("loc", ()) if not isinstance(p, int)) or None
    message = first.get("msg", "invalid request")
    if first.get("type") == "extra_forbidden":
        message = f"Unrecognized request argument supplied: {param}"
    return APIError(400, f"{message} (param: {param})" if param else message, param=param)


async def _parse(request: Request, model: type[BaseModel]) -> Any:
    try:
        body = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(400, "The request body is not valid JSON.") from exc
    if not isinstance(body, dict):
        raise APIError(400, "The request body must be a JSON object.")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc) from exc


def create_app() -> FastAPI:
    """The FastAPI app; set `app.state.server` to an OpenAIServer before serving."""
    app = FastAPI(title="sift-serve", description="OpenAI-compatible API with test-time fine-tuning (SIFT + LoRA)")

    def server_of(request: Request) -> OpenAIServer:
        return request.app.state.server

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        server_of(request).metrics.requests.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        server_of(request).metrics.requests.labels(request.url.path, "500").inc()
        body = APIError(500, "The server had an error while processing your request.", "server_error").body()
        return JSONResponse(body, status_code=500)

    async def serve(request: Request, model: type[BaseModel], route: str) -> Response:
        server = server_of(request)
        server.check_auth(request.headers.get("authorization"))
        parsed = await _parse(request, model)
        server.admit()
        try:
            handler = server.chat if route == "chat" else server.completion
            result = await handler(parsed)
        except BaseException:
            server.leave()
            raise
        if isinstance(result, dict):
            server.leave()
            server.metrics.requests.labels(request.url.path, "200").inc()
            return JSONResponse(result)
        server.metrics.requests.labels(request.url.path, "200").inc()
        return StreamingResponse(_guarded(server, result), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await serve(request, ChatCompletionRequest, "chat")

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await serve(request, CompletionRequest, "completion")

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        server = server_of(request)
        server.check_auth(request.headers.get("authorization"))
        return JSONResponse(server.models())

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        return Response(generate_latest(server_of(request).metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


async def _guarded(server: OpenAIServer, stream: AsyncIterator[str]) -> AsyncIterator[str]:
    """SSE lines; an error mid-stream becomes an OpenAI-shaped error event, then the stream ends."""
    try:
        async for line in stream:
            yield line
    except APIError as exc:
        yield f"data: {json.dumps(exc.body())}\n\n"
        yield "data: [DONE]\n\n"
    except Exception:
        log.exception("error while streaming")
        error = APIError(500, "The server had an error while streaming.", "server_error")
        yield f"data: {json.dumps(error.body())}\n\n"
        yield "data: [DONE]\n\n"
    finally:
        server.leave()
        await stream.aclose()  # type: ignore[attr-defined]

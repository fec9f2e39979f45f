"""The FastAPI application: routes, auth, request-size limit, CORS, error shapes."""

from __future__ import annotations

import hmac

from fastapi import Depends, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse

from .chat import create_chat_completion
from .completions import create_completion
from .dashboard.routes import dashboard_router
from .errors import APIError, document_errors, install_error_handlers, lone_surrogate_error
from .messages import count_message_tokens, create_message
from .messages_protocol import MessagesCountTokensRequest, MessagesRequest
from .protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .responses import responses_router
from .state import ServerState


class _BodyLimit:
    """413 for bodies over the limit: checked on the declared length, and on the bytes actually sent (a chunked
    body is read here, up to the limit, then replayed to the app). The buffered body is also checked for lone
    UTF-16 surrogates (400), once for every route."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await self._reject(scope, send)
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the app see it
                chunks = None
                pending = message
                break
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                return await self._reject(scope, send)
            if not message.get("more_body", False):
                break
        if chunks:  # the whole body is here: refuse text that is not Unicode before any route reads it
            invalid = lone_surrogate_error(b"".join(chunks))
            if invalid is not None:
                return await invalid.response(scope.get("path"))(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if chunks is None:
                return pending
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()  # after the body: disconnect notices

        return await self.app(scope, replay, send)

    async def _reject(self, scope, send):
        response = APIError(413, f"request body is larger than the server's limit of {self.max_bytes} bytes",
                            code="request_too_large").response(scope.get("path"))
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(response.body)).encode())]})
        await send({"type": "http.response.body", "body": response.body})


def build_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="trinity", version="0.1.0",
                  description="OpenAI-compatible server for the Arcee Trinity model family.")
    app.state.trinity = state
    install_error_handlers(app)
    if state.settings.allowed_origins:
        app.add_middleware(CORSMiddleware, allow_origins=state.settings.allowed_origins, allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_BodyLimit, max_bytes=state.settings.max_request_bytes)

    def authorize(request: Request) -> None:
        key = state.settings.api_key
        if key is None:
            return
        header = request.headers.get("authorization", "")
        # Anthropic clients send the key as x-api-key (Claude Code's ANTHROPIC_API_KEY), OpenAI's as a bearer token
        given = header[7:] if header.lower().startswith("bearer ") else request.headers.get("x-api-key", "")
        # constant-time compare, so the key cannot be found one character at a time
        if not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "missing or invalid API key (send 'Authorization: Bearer <key>' or "
                                "'x-api-key: <key>')",
                           code="invalid_api_key")

    auth = [Depends(authorize)]

    @app.get("/health")
    async def health():
        if state.draining:
            raise APIError(503, "the server is shutting down", code="draining", headers={"Retry-After": "5"})
        if state.failure is not None:
            raise APIError(503, f"the engine failed: {state.failure}", code="engine_failed")
        if not state.ready:
            raise APIError(503, state.load_error or "the model is still loading", code="loading",
                           headers={"Retry-After": "5"})
        return JSONResponse({"status": "ok"})

    @app.get("/v1/models", dependencies=auth)
    async def models():
        return {"object": "list", "data": [{
            "id": state.settings.served_model_name, "object": "model", "created": state.created,
            "owned_by": "trinity", "max_model_len": state.max_model_len}]}

    @app.post("/v1/chat/completions", dependencies=auth)
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        return await create_chat_completion(state, body, request)

    @app.post("/v1/messages", dependencies=auth)  # Anthropic's Messages API over the same chat pipeline
    async def messages(body: MessagesRequest, request: Request):
        return await create_message(state, body, request)

    @app.post("/v1/messages/count_tokens", dependencies=auth)
    async def messages_count_tokens(body: MessagesCountTokensRequest):
        return await count_message_tokens(state, body)

    app.include_router(responses_router(state, auth))  # OpenAI's Responses API over the same chat pipeline

    @app.post("/v1/completions", dependencies=auth)
    async def completions(body: CompletionRequest, request: Request):
        return await create_completion(state, body, request)

    @app.post("/tokenize", dependencies=auth)
    async def tokenize(body: TokenizeRequest):
        state.admit(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            from ..chat_template import ChatTemplateError

            try:
                ids = state.tokenizer.apply_chat_template([m.model_dump(exclude_none=True) for m in body.messages],
                                                          add_generation_prompt=body.add_generation_prompt,
                                                          tokenize=True)
            except ChatTemplateError as e:
                raise APIError(400, str(e), param="messages") from None
        else:
            ids = state.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        return {"tokens": ids, "count": len(ids), "max_model_len": state.max_model_len}

    @app.post("/detokenize", dependencies=auth)
    async def detokenize(body: DetokenizeRequest):
        state.admit(body.model)
        bad = [t for t in body.tokens if t >= state.vocab_size]
        if bad:
            raise APIError(400, f"token id {bad[0]} is out of range [0, {state.vocab_size})", param="tokens")
        return {"prompt": state.tokenizer.decode(body.tokens)}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        if state.engine is not None:
            state.metrics.update_from_engine(state.engine.stats, state.engine.expert_load)
        return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")

    app.include_router(dashboard_router(state))  # /dashboard and its event stream; own key check

    generated = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:  # built once, then served from FastAPI's cache
            app.openapi_schema = document_errors(generated())
        return app.openapi_schema

    app.openapi = openapi
    return app

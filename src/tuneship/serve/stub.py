"""A small OpenAI-compatible upstream with a fixed answer: a real HTTP server for router tests and for the
router-overhead benchmark, where a real model would only add noise. It is not a model server.

`stub_app(...)` answers /v1/chat/completions and /v1/completions (streamed or not) with `content`, names
itself `model`, and can be told to fail (`status`), to answer slowly (`delay`), or to answer something else
at run time through `app.state.stub` (a `StubState`).
`ServerThread` runs any ASGI app under uvicorn on a loopback socket in a background thread.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class StubState:
    content: str = '{"title": "Engineer", "company": "Acme", "location": "Berlin", "remote": false}'
    model: str = "stub"
    status: int = 200
    delay: float = 0.0
    chunks: int = 4
    chunk_delay: float = 0.0
    calls: int = 0


def stub_app(**kw) -> Starlette:
    state = StubState(**kw)

    def completion(kind: str, model: str) -> dict:
        if kind == "chat":
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": state.content},
                "finish_reason": "stop",
            }
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": state.content, "finish_reason": "stop", "logprobs": None}
            obj = "text_completion"
        return {
            "id": "stub-1",
            "object": obj,
            "created": int(time.time()),
            "model": state.model or model,
            "choices": [choice],
            "usage": {"prompt_tokens": 5, "completion_tokens": 7, "total_tokens": 12},
        }

    async def stream(kind: str, model: str):
        n = max(1, state.chunks)
        size = max(1, len(state.content) // n + 1)
        for i in range(0, len(state.content), size):
            piece = state.content[i : i + size]
            if kind == "chat":
                choice = {"index": 0, "delta": {"content": piece}, "finish_reason": None}
            else:
                choice = {"index": 0, "text": piece, "finish_reason": None}
            event = {
                "id": "stub-1",
                "object": "chat.completion.chunk",
                "model": state.model or model,
                "choices": [choice],
            }
            yield f"data: {json.dumps(event)}\n\n".encode()
            if state.chunk_delay:
                await asyncio.sleep(state.chunk_delay)
        yield b"data: [DONE]\n\n"

    async def handle(request: Request, kind: str) -> Response:
        state.calls += 1
        body = await request.json()
        if state.delay:
            await asyncio.sleep(state.delay)
        if state.status != 200:
            return JSONResponse(
                {"error": {"message": "stub failure", "type": "server_error"}}, status_code=state.status
            )
        if body.get("stream"):
            return StreamingResponse(stream(kind, body.get("model", "")), media_type="text/event-stream")
        return JSONResponse(completion(kind, body.get("model", "")))

    async def chat(request: Request) -> Response:
        return await handle(request, "chat")

    async def completions(request: Request) -> Response:
        return await handle(request, "text")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": state.model, "object": "model"}]})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    app.state.stub = state
    return app


def bind(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY only on sockets that say so, and without it
    # a response written in two parts waits ~40 ms for the peer's delayed ACK.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    return sock


class ServerThread:
    """uvicorn serving `app` on a loopback socket in a daemon thread; `stop()` shuts it down gracefully."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0):
        import uvicorn

        self.app = app
        self.sock = bind(host, port)
        self.host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{self.host}:{self.port}"
        config = uvicorn.Config(
            app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=10
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    def start(self, timeout: float = 15.0) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"server on {self.url} did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

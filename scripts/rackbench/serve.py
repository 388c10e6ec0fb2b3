"""An OpenAI-compatible completions server around one rackbench Engine (aiohttp).

``python -m rackbench.serve --engine-dir DIR [--backend reference] [--host H] [--port P]``

The demo's engine server: one per engine replica, driven by one LoadGen through
``rackbench.endpoints.EndpointPool``. It speaks the subset of ``/v1/completions``
that the pool sends to ``trtllm-serve`` (facts in tests/contracts/trtllm_serve_1_2.yaml),
so one client serves both:

* request: ``model``, ``prompt`` as token ids (one list, or a list of lists),
  ``max_tokens``, ``stream``, ``temperature`` (greedy engines accept 0 or None),
  ``detokenize`` (false: ``choices[].token_ids`` carry the ids, ``text`` is empty,
  as trtllm-serve does), ``ignore_eos`` (must be false: the engines stop at EOS),
  ``stream_options``; unknown fields are rejected (400), like trtllm-serve's
  ``extra="forbid"`` pydantic models;
* response: ``choices[i]`` with ``index``, ``text``, ``token_ids``, ``finish_reason``
  (``length`` at ``max_tokens``, else ``stop``) and ``usage``;
* streamed: Server-Sent Events ``data: {chunk}`` lines, a chunk with the first token
  as soon as the engine reports it (``on_first_token``), then one with the rest and
  ``finish_reason``, then ``data: [DONE]``;
* ``GET /health``: 200 once the engine is loaded, 503 while it loads (the port is
  bound first, so a port in use fails at once rather than after the load).

The engine is driven through the asynchronous Engine contract
(``rackbench.engines.Engine.submit``). Engines that only have the older blocking
``generate(prompts, max_new_tokens)`` are wrapped in ``BlockingEngineAdapter``.

The engine runs in a child process (``--engine-process child``, the default): a
``ReplicaPool`` of one replica, requests and results over a pipe. In one process the
aiohttp loop's work (JSON, responses) shared the engine's GIL and slowed the engine's
own steps by ~18 % (bench/engine_http_interference.py, BENCHMARKS note 9). If the engine
process dies, the server stops with exit code 1, saying why, so the launcher sees it die.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

from aiohttp import web

try:  # 5-10x faster for token-id lists; the stdlib is the fallback
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    orjson = None
    _loads = json.loads

    def _dumps(obj) -> bytes:
        return json.dumps(obj).encode()


HEALTH_ROUTE = "/health"
COMPLETIONS_ROUTE = "/v1/completions"
MODELS_ROUTE = "/v1/models"

# The request fields this server understands; anything else is a 400, naming the field.
REQUEST_FIELDS = frozenset(
    {
        "model",
        "prompt",
        "max_tokens",
        "stream",
        "stream_options",
        "temperature",
        "top_p",
        "top_k",
        "detokenize",
        "ignore_eos",
        "n",
        "stop_token_ids",
    }
)


# --------------------------------------------------------------------------- engines


class BlockingEngineAdapter:
    """The asynchronous Engine contract over an engine with only blocking ``generate``.

    One worker thread takes every request queued so far (up to ``max_batch_size``,
    grouped by ``max_new_tokens``) and runs them as one ``generate`` call. Requests
    that arrive meanwhile wait for the next call, so this is batch-at-a-time, not
    continuous batching; and the first token is only known when the whole call ends
    (``on_first_token`` fires just before ``on_done``). It exists so the server runs
    on engines that predate ``submit``; an engine with its own ``submit`` is used as is.
    """

    def __init__(self, engine, max_batch_size: int | None = None):
        self.engine = engine
        self.max_in_flight = int(max_batch_size or getattr(engine, "max_batch_size", 64) or 64)
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="blocking-engine-adapter", daemon=True)
        self._thread.start()

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None):
        if self._closed:
            on_error(RuntimeError("engine closed"))
            return
        self._queue.put((list(prompt), int(max_new_tokens), on_done, on_error, on_first_token))

    def _run(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            batch = [item]
            while len(batch) < self.max_in_flight:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self._queue.put(None)
                    break
                batch.append(nxt)
            by_len: dict[int, list] = {}
            for req in batch:
                by_len.setdefault(req[1], []).append(req)
            for max_new, reqs in by_len.items():
                try:
                    outs = self.engine.generate([r[0] for r in reqs], max_new)
                except BaseException as exc:  # the engine's error goes to each request
                    for r in reqs:
                        r[3](exc)
                    continue
                for r, tokens in zip(reqs, outs):
                    tokens = list(tokens)
                    if tokens and r[4] is not None:
                        r[4](tokens[0])
                    r[2](tokens)

    def close(self):
        if not self._closed:
            self._closed = True
            self._queue.put(None)
            self._thread.join(timeout=60)
            close = getattr(self.engine, "close", None)
            if close:
                close()


class InstantEngine:
    """A zero-cost engine for benchmarking and testing the HTTP path (bench/rack_client.py,
    tests): it answers with ``min(max_new_tokens, output_len)`` tokens, each the prompt's
    last id plus its position; at once, or after ``delay_s`` from a timer thread (so a
    test can kill a server while requests are open). Never used for results."""

    def __init__(self, output_len: int = 1, max_in_flight: int = 1 << 20, delay_s: float = 0.0):
        self.output_len = output_len
        self.max_in_flight = max_in_flight
        self.delay_s = delay_s

    def _answer(self, prompt, max_new_tokens, on_done, on_first_token):
        last = prompt[-1] if prompt else 0
        tokens = [last + i + 1 for i in range(min(max_new_tokens, self.output_len))]
        if tokens and on_first_token is not None:
            on_first_token(tokens[0])
        on_done(tokens)

    def submit(self, prompt, max_new_tokens, *, on_done, on_error, on_first_token=None):
        if self.delay_s > 0:
            threading.Timer(self.delay_s, self._answer, (prompt, max_new_tokens, on_done, on_first_token)).start()
        else:
            self._answer(prompt, max_new_tokens, on_done, on_first_token)

    def close(self):
        pass


def as_async_engine(engine):
    """``engine`` itself if it has ``submit``, else wrapped in ``BlockingEngineAdapter``."""
    return engine if hasattr(engine, "submit") else BlockingEngineAdapter(engine)


def load_engine(
    backend: str, engine_dir, *, settings: dict | None = None, gpu_ids=None, own_process=False, on_exit=None
):
    """The engine, in this process; or with ``own_process``, in a child process behind the same
    contract (a ``ReplicaPool`` of one replica; ``on_exit(why)`` if that process dies). A
    server with several GPUs leaves that to the backend, whose own ``load`` then starts one
    process per replica."""
    if backend == "instant":
        settings = settings or {}
        return InstantEngine(output_len=int(settings.get("output_len", 1)), delay_s=float(settings.get("delay_s", 0)))
    from rackbench.engines import BACKENDS, backend_module

    record_path = Path(engine_dir) / "engine.json"
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    gpu_ids = list(gpu_ids or [])
    if own_process and len(gpu_ids) <= 1:
        from rackbench.engines.replicas import ReplicaPool

        if backend not in BACKENDS:
            backend_module(backend)  # its error names the known backends
        return ReplicaPool(  # the backend (torch, CUDA) is imported in the child only
            BACKENDS[backend],
            engine_dir,
            record=record,
            settings=settings or {},
            gpu_ids=gpu_ids,
            gpus_per_replica=len(gpu_ids),
            on_replica_exit=(lambda r, why: on_exit(why)) if on_exit else None,
        )
    engine = backend_module(backend).load(engine_dir, record=record, gpu_ids=gpu_ids, settings=settings or {})
    return as_async_engine(engine)


# --------------------------------------------------------------------------- HTTP


class BadRequest(ValueError):
    pass


def _token_ids(p) -> bool:
    """Whether ``p`` looks like a non-empty list of token ids. Only the ends are checked:
    a full scan costs more than everything else a zero-cost server does per sample, and
    a non-int inside still fails, as an engine error (HTTP 500) instead of a 400."""
    return type(p) is list and bool(p) and type(p[0]) is int and type(p[-1]) is int


def _parse_request(body) -> tuple[list[list[int]], int, bool, bool]:
    """(prompts, max_tokens, stream, detokenize) from a completions body; BadRequest names the problem."""
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    unknown = sorted(set(body) - REQUEST_FIELDS)
    if unknown:
        raise BadRequest(f"unsupported request field(s) {unknown}; this server accepts {sorted(REQUEST_FIELDS)}")
    prompt = body.get("prompt")
    if type(prompt) is list and prompt and type(prompt[0]) is int and _token_ids(prompt):
        prompts = [prompt]
    elif type(prompt) is list and prompt and all(_token_ids(p) for p in prompt):
        prompts = prompt
    else:
        raise BadRequest(
            "prompt must be token ids: a non-empty list of ints or a list of such lists "
            "(this server has no tokenizer for text prompts)"
        )
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise BadRequest(f"max_tokens must be a positive int, got {max_tokens!r}")
    temperature = body.get("temperature")
    if temperature not in (None, 0, 0.0):
        raise BadRequest(f"temperature {temperature!r}: the engine decodes greedily; send 0 or omit it")
    if body.get("top_k") not in (None, 0, 1):
        raise BadRequest(f"top_k {body['top_k']!r}: the engine decodes greedily")
    if body.get("ignore_eos"):
        raise BadRequest("ignore_eos is not supported: the engine stops at its end-of-sequence token")
    if body.get("n", 1) != 1:
        raise BadRequest("n must be 1")
    if body.get("stream_options") and not body.get("stream"):
        raise BadRequest("stream_options can only be given when stream is true")
    return prompts, max_tokens, bool(body.get("stream", False)), bool(body.get("detokenize", True))


class CompletionServer:
    """The aiohttp application around one engine (loaded later: ``set_engine``)."""

    def __init__(self, model_name: str, decode: Callable[[list[int]], str] | None = None):
        self.model_name = model_name
        self.decode = decode
        self.engine = None
        self.engine_error: str | None = None
        self.app = web.Application(client_max_size=64 * 1024 * 1024)
        self.app.router.add_get(HEALTH_ROUTE, self.health)
        self.app.router.add_get(MODELS_ROUTE, self.models)
        self.app.router.add_post(COMPLETIONS_ROUTE, self.completions)

    def set_engine(self, engine):
        self.engine = engine

    async def health(self, request):
        if self.engine_error:
            return web.Response(status=500, text=f"engine unavailable: {self.engine_error}")
        return web.Response(status=200 if self.engine is not None else 503)

    async def models(self, request):
        return web.json_response({"object": "list", "data": [{"id": self.model_name, "object": "model"}]})

    def _choice(self, index, tokens, max_tokens, detokenize, finished=True):
        text = self.decode(tokens) if (detokenize and self.decode) else ""
        choice = {"index": index, "text": text, "token_ids": None if detokenize else tokens}
        choice["finish_reason"] = ("length" if len(tokens) >= max_tokens else "stop") if finished else None
        return choice

    def _submit(self, loop, prompt, max_tokens, on_first=None):
        """Submit to the engine; an asyncio future of the tokens (callbacks come from the engine's thread)."""
        fut = loop.create_future()
        loop_thread = threading.get_ident()

        def settle(ok, value):
            if not fut.done():
                (fut.set_result if ok else fut.set_exception)(value)

        def on_loop(fn, *args):
            # Engines that answer on this thread (InstantEngine) need no cross-thread wake-up.
            if threading.get_ident() == loop_thread:
                fn(*args)
            else:
                loop.call_soon_threadsafe(fn, *args)

        first = None
        if on_first is not None:

            def first(token_id):
                on_loop(on_first, token_id)

        self.engine.submit(
            prompt,
            max_tokens,
            on_done=lambda toks: on_loop(settle, True, list(toks)),
            on_error=lambda exc: on_loop(settle, False, exc),
            on_first_token=first,
        )
        return fut

    async def completions(self, request):
        if self.engine is None:
            return web.json_response(_error("engine is not loaded yet", 503), status=503)
        try:
            body = _loads(await request.read())
        except ValueError as exc:
            return web.json_response(_error(f"request body is not JSON: {exc}", 400), status=400)
        try:
            prompts, max_tokens, stream, detokenize = _parse_request(body)
        except BadRequest as exc:
            return web.json_response(_error(str(exc), 400), status=400)
        loop = asyncio.get_running_loop()
        rid = f"cmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        usage_prompt = sum(map(len, prompts))
        if not stream:
            try:
                outs = await asyncio.gather(*(self._submit(loop, p, max_tokens) for p in prompts))
            except Exception as exc:
                return web.json_response(_error(f"engine error: {exc!r}", 500), status=500)
            completion = sum(map(len, outs))
            return _json_response(
                {
                    "id": rid,
                    "object": "text_completion",
                    "created": created,
                    "model": self.model_name,
                    "choices": [self._choice(i, t, max_tokens, detokenize) for i, t in enumerate(outs)],
                    "usage": {
                        "prompt_tokens": usage_prompt,
                        "completion_tokens": completion,
                        "total_tokens": usage_prompt + completion,
                    },
                }
            )

        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await resp.prepare(request)
        events: asyncio.Queue = asyncio.Queue()
        sent_first = [False] * len(prompts)
        pending = []
        for i, p in enumerate(prompts):
            fut = self._submit(loop, p, max_tokens, on_first=lambda tok, i=i: events.put_nowait(("first", i, tok)))
            fut.add_done_callback(lambda f, i=i: events.put_nowait(("done", i, f)))
            pending.append(fut)

        def event(choices, **extra):
            """One server-sent event of the stream (the OpenAI completions chunk)."""
            body = {"id": rid, "object": "text_completion", "created": created, "model": self.model_name}
            return b"data: " + _dumps({**body, "choices": choices, **extra}) + b"\n\n"

        def chunk(choice):
            return event([choice])

        remaining = len(prompts)
        completion = 0
        while remaining:
            batch = [await events.get()]
            while not events.empty():  # everything ready now goes out in one write
                batch.append(events.get_nowait())
            out = []
            for kind, i, value in batch:
                if kind == "first":
                    if not sent_first[i]:
                        sent_first[i] = True
                        out.append(chunk(self._choice(i, [value], max_tokens, detokenize, finished=False)))
                    continue
                remaining -= 1
                if value.exception() is not None:
                    out.append(b"data: " + _dumps(_error(f"engine error: {value.exception()!r}", 500)) + b"\n\n")
                    out.append(b"data: [DONE]\n\n")
                    await resp.write(b"".join(out))
                    return resp
                tokens = value.result()
                completion += len(tokens)
                choice = self._choice(i, tokens[1:] if sent_first[i] else tokens, max_tokens, detokenize)
                choice["finish_reason"] = "length" if len(tokens) >= max_tokens else "stop"
                out.append(chunk(choice))
            await resp.write(b"".join(out))
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {
                "prompt_tokens": usage_prompt,
                "completion_tokens": completion,
                "total_tokens": usage_prompt + completion,
            }
            await resp.write(event([], usage=usage))
        await resp.write(b"data: [DONE]\n\n")
        return resp


def _json_response(obj, status=200):
    return web.Response(body=_dumps(obj), status=status, content_type="application/json")


def _error(message: str, code: int) -> dict:
    # trtllm-serve's ErrorResponse shape (openai_protocol.py): object, message, type, code.
    return {
        "object": "error",
        "message": message,
        "type": "BadRequestError" if code == 400 else "ServerError",
        "code": code,
    }


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on host:port; a clear error if the port is taken."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(
            f"rackbench.serve: cannot bind {host}:{port}: {exc.strerror or exc} (is another server using port {port}?)"
        ) from None
    sock.listen(1024)
    sock.setblocking(False)
    return sock


async def serve_sockets(
    servers: list[tuple[CompletionServer, socket.socket]],
    stop: asyncio.Event,
    on_started: Callable[[], None] | None = None,
):
    """Run every (server, socket) pair on this event loop until ``stop`` is set."""
    runners = []
    for srv, sock in servers:
        runner = web.AppRunner(srv.app, access_log=None, handle_signals=False)
        await runner.setup()
        await web.SockSite(runner, sock).start()
        runners.append(runner)
    if on_started:
        on_started()
    try:
        await stop.wait()
    finally:
        for runner in runners:
            await runner.cleanup()


def _tokenizer_decode(engine_dir):
    path = Path(engine_dir) / "tokenizer.json"
    if not path.is_file():
        return None
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(path))
    return lambda ids: tok.decode(ids, skip_special_tokens=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m rackbench.serve", description=__doc__.split("\n\n")[0])
    p.add_argument("--engine-dir", type=Path, help="the engine directory (not needed for --backend instant)")
    p.add_argument("--backend", default="reference", help="rackbench engine backend, or 'instant' (zero-cost)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument(
        "--port",
        type=int,
        action="append",
        required=True,
        help="port to serve on; repeat it to serve one engine on several ports (benchmark stubs)",
    )
    p.add_argument("--settings", default="{}", help="engine settings as JSON")
    p.add_argument("--gpu-ids", default="", help="comma-separated device indices as this process sees them")
    p.add_argument("--model-name", default=None, help="name reported in responses (default: engine dir name)")
    p.add_argument(
        "--engine-process",
        choices=("child", "inline"),
        default="child",
        help="run the engine in a child process (default: the HTTP loop does not share its GIL) "
        "or in this one (inline; the 'instant' backend always is)",
    )
    args = p.parse_args(argv)
    if args.backend != "instant" and args.engine_dir is None:
        p.error("--engine-dir is required unless --backend instant")
    try:
        settings = json.loads(args.settings)
    except ValueError as exc:
        p.error(f"--settings is not JSON: {exc}")
    socks = [bind_socket(args.host, port) for port in args.port]  # before loading: a taken port fails fast
    name = args.model_name or (args.engine_dir.name if args.engine_dir else "instant")
    decode = _tokenizer_decode(args.engine_dir) if args.engine_dir else None
    server = CompletionServer(name, decode=decode)
    gpu_ids = [int(g) for g in args.gpu_ids.split(",") if g.strip()]

    async def run():
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def engine_exited(why):  # from the engine's reader thread: this server is of no use now
            def stop_serving():
                if not stop.is_set():
                    server.engine_error = why
                    print(f"rackbench.serve: {why}; stopping", file=sys.stderr, flush=True)
                    stop.set()

            loop.call_soon_threadsafe(stop_serving)

        def load():
            try:
                engine = load_engine(
                    args.backend,
                    args.engine_dir,
                    settings=settings,
                    gpu_ids=gpu_ids,
                    own_process=args.engine_process == "child",
                    on_exit=engine_exited,
                )
                server.set_engine(engine)
                print(
                    f"rackbench.serve: engine ready on {args.host}:{','.join(map(str, args.port))}",
                    file=sys.stderr,
                    flush=True,
                )
            except BaseException as exc:
                server.engine_error = repr(exc)
                print(f"rackbench.serve: engine failed to load: {exc!r}", file=sys.stderr, flush=True)
                loop.call_soon_threadsafe(stop.set)

        await serve_sockets(
            [(server, s) for s in socks], stop, on_started=lambda: threading.Thread(target=load, daemon=True).start()
        )
        if server.engine is not None:
            server.engine.close()

    from rackbench.endpoints import new_event_loop

    loop = new_event_loop()
    try:
        loop.run_until_complete(run())
    finally:
        loop.close()
    return 1 if server.engine_error else 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())

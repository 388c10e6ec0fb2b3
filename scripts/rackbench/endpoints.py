"""EndpointPool: the asynchronous Engine contract over N OpenAI-compatible completion endpoints.

The rack run's one LoadGen drives every engine server through one pool (issue 10):
the harness's SUT calls ``pool.submit(prompt, max_new_tokens, on_done=..., on_error=...,
on_first_token=...)`` exactly as it would a local engine.

* Load balancing (``balance``): ``isl`` (default) sends each request to the endpoint
  with the smallest cumulative input length dispatched so far, as NVIDIA's MLPerf
  harness does (``isl_load_balancing``); ``round_robin``; ``least_pending`` (fewest
  unfinished requests).
* Offline requests are not streamed (``stream=False``); Server and Interactive are
  (``stream=True``): the first SSE chunk with a token calls ``on_first_token``.
* Output token ids: ``api="token_ids"`` (trtllm-serve, ``rackbench.serve``) sends the
  prompt as token ids with ``detokenize: false`` and takes ``choices[].token_ids``;
  ``api="text"`` (servers whose completions API takes text only, e.g. ``transformers
  serve``) decodes the prompt with the model's tokenizer and re-encodes the returned
  text, as NVIDIA's client does (``http_async_client.py``). Where the server returns
  ids they are used as they are.
* Up to ``concurrency`` HTTP requests per endpoint are open at once; requests beyond
  that wait in the pool. With ``batch_size > 1`` the samples waiting for one endpoint
  go out together as one request whose ``prompt`` is a list of token-id lists (the
  OpenAI completions API allows a list of prompts), which is what makes tens of
  thousands of samples/s reachable from one Python process.
* Readiness: ``wait_ready(timeout)`` polls each endpoint's ``/health`` until it
  answers 200 and raises ``EndpointError`` naming the endpoints that did not.
* Faults: a request that fails (connection refused or reset, server killed, HTTP error,
  malformed stream, ``request_timeout``) calls ``on_error(EndpointError)`` naming the
  endpoint URL; the endpoint is then marked dead and later requests sent to it fail
  at once, so the run ends instead of hanging.
* Counters per endpoint (``stats()``, ``write_stats(path)``): samples, input and
  output tokens, requests, errors and busy seconds (wall time with at least one
  request open).

* Bursts (``add_burst_listener(fn)``): ``fn()`` runs after each burst of callbacks (one
  response, one read of a stream, one batch of failures); the harness's SUT uses it to hand
  LoadGen each burst's completions in one call.

All HTTP runs on one asyncio event loop in a background thread (aiohttp); callbacks
run on that thread. Per-sample costs and what is left are in BENCHMARKS.md (notes 8, 8a).
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import aiohttp

try:  # 5-10x faster for token-id lists; the stdlib is the fallback
    import orjson

    _loads, _dumps = orjson.loads, orjson.dumps
except ImportError:  # pragma: no cover
    _loads = json.loads

    def _dumps(obj) -> bytes:
        return json.dumps(obj).encode()


_JSON_HEADERS = {"Content-Type": "application/json"}

BALANCERS = ("isl", "round_robin", "least_pending")
# Which LoadGen scenarios stream (issue 10: Offline is not streamed; Server and Interactive
# are, and their first chunk is LoadGen's FirstTokenComplete).
STREAMED_SCENARIOS = {"Offline": False, "Server": True, "Interactive": True}
APIS = ("token_ids", "text")
HEALTH_ROUTE = "/health"
COMPLETIONS_ROUTE = "/v1/completions"


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop where installed (a fraction of asyncio's per-request CPU), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def stream_for(scenario: str) -> bool:
    try:
        return STREAMED_SCENARIOS[scenario]
    except KeyError:
        raise ValueError(f"unknown scenario {scenario!r}; known: {sorted(STREAMED_SCENARIOS)}") from None


def urls_from_env(env=None) -> list[str]:
    """The endpoint URLs ``python -m rackbench.launch`` hands its command (``$RACKBENCH_ENDPOINTS``)."""
    import os

    from rackbench.launch import ENDPOINTS_ENV

    value = (env if env is not None else os.environ).get(ENDPOINTS_ENV, "")
    urls = [u for u in value.split(",") if u]
    if not urls:
        raise ValueError(f"${ENDPOINTS_ENV} is empty: run under `python -m rackbench.launch ... -- CMD`")
    return urls


class EndpointError(RuntimeError):
    """A request or readiness failure, naming the endpoint URL."""

    def __init__(self, url: str, message: str, *, status: int | None = None):
        super().__init__(f"endpoint {url}: {message}")
        self.url = url
        self.status = status  # the HTTP status, where the server answered one


@dataclass
class EndpointStats:
    url: str
    samples: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    errors: int = 0
    busy_s: float = 0.0
    dispatched_input_tokens: int = 0  # the isl balancer's key: counted at dispatch
    pending: int = 0  # submitted samples not yet finished
    open_requests: int = 0
    dead: str | None = None
    _busy_since: float | None = field(default=None, repr=False)

    def public(self) -> dict:
        d = asdict(self)
        d.pop("_busy_since")
        if self._busy_since is not None:
            d["busy_s"] += time.monotonic() - self._busy_since
        return d


class _Request:
    __slots__ = ("prompt", "max_new_tokens", "on_done", "on_error", "on_first_token", "first_sent", "completed")

    def __init__(self, prompt, max_new_tokens, on_done, on_error, on_first_token):
        self.prompt = prompt
        self.max_new_tokens = max_new_tokens
        self.on_done = on_done
        self.on_error = on_error
        self.on_first_token = on_first_token
        self.first_sent = False
        self.completed = False


def choose_endpoint(stats: Sequence[EndpointStats], balance: str, counter: int) -> int:
    """The endpoint index for the next request (dead endpoints are skipped while any live one is left)."""
    if balance == "isl" and not any(s.dead for s in stats):
        best, key = 0, stats[0].dispatched_input_tokens
        for i in range(1, len(stats)):
            k = stats[i].dispatched_input_tokens
            if k < key:
                best, key = i, k
        return best
    live = [i for i, s in enumerate(stats) if s.dead is None] or list(range(len(stats)))
    if balance == "isl":
        return min(live, key=lambda i: stats[i].dispatched_input_tokens)
    if balance == "least_pending":
        return min(live, key=lambda i: stats[i].pending)
    if balance == "round_robin":
        return live[counter % len(live)]
    raise ValueError(f"unknown balance {balance!r}; known: {list(BALANCERS)}")


class EndpointPool:
    """The Engine contract (``submit``/``max_in_flight``/``close``) over HTTP endpoints."""

    def __init__(
        self,
        urls: Sequence[str],
        *,
        model: str = "rackbench",
        stream: bool = False,
        balance: str = "isl",
        api: str = "token_ids",
        tokenizer=None,
        concurrency: int = 256,
        batch_size: int = 1,
        request_timeout: float | None = None,
        extra_body: dict | None = None,
        fail_dead_endpoints: bool = True,
    ):
        if not urls:
            raise ValueError("EndpointPool needs at least one endpoint URL")
        if balance not in BALANCERS:
            raise ValueError(f"unknown balance {balance!r}; known: {list(BALANCERS)}")
        if api not in APIS:
            raise ValueError(f"unknown api {api!r}; known: {list(APIS)}")
        if api == "text" and tokenizer is None:
            raise ValueError("api='text' needs the model's tokenizer (to decode prompts and re-encode outputs)")
        if concurrency < 1 or batch_size < 1:
            raise ValueError("concurrency and batch_size must be >= 1")
        self.urls = [u.rstrip("/") for u in urls]
        self.model = model
        self.stream = stream
        self.balance = balance
        self.api = api
        self.tokenizer = _as_tokenizer(tokenizer) if tokenizer is not None else None
        self.concurrency = concurrency
        self.batch_size = batch_size
        self.request_timeout = request_timeout
        self.extra_body = dict(extra_body or {})
        self.fail_dead_endpoints = fail_dead_endpoints
        self.max_in_flight = concurrency * batch_size * len(self.urls)
        self._stats = [EndpointStats(u) for u in self.urls]
        # isl with every endpoint live: a heap of (dispatched input tokens, index), so a pick is
        # O(log N) instead of a scan of all N (the same choice: smallest key, then lowest index)
        self._isl_heap = [(0, i) for i in range(len(self.urls))]
        self._any_dead = False
        self._burst_listeners: list[Callable[[], None]] = []
        self._waiting = [collections.deque() for _ in self.urls]
        self._inbox: collections.deque = collections.deque()
        self._wake_scheduled = False
        self._lock = threading.Lock()
        self._counter = 0
        self._closed = False
        self._loop = new_event_loop()
        self._loop_thread_id: int | None = None
        self._session: aiohttp.ClientSession | None = None
        started = threading.Event()
        self._thread = threading.Thread(target=self._run_loop, args=(started,), name="endpoint-pool", daemon=True)
        self._thread.start()
        started.wait()

    # ------------------------------------------------------------------ loop thread
    def _run_loop(self, started):
        asyncio.set_event_loop(self._loop)
        self._loop_thread_id = threading.get_ident()

        async def make_session():
            connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=None)
            timeout = aiohttp.ClientTimeout(total=None, sock_read=self.request_timeout)
            self._session = aiohttp.ClientSession(connector=connector, timeout=timeout)

        self._loop.run_until_complete(make_session())
        started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._session.close())
        self._loop.close()

    def _call(self, coro, timeout=None):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # ------------------------------------------------------------------ Engine contract
    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int,
        *,
        on_done: Callable[[list[int]], None],
        on_error: Callable[[BaseException], None],
        on_first_token: Callable[[int], None] | None = None,
    ) -> None:
        if self._closed:
            on_error(RuntimeError("EndpointPool is closed"))
            self._burst_end()
            return
        req = _Request(prompt, max_new_tokens, on_done, on_error, on_first_token)
        n = len(prompt)
        with self._lock:
            if self.balance == "isl" and not self._any_dead:
                key, i = self._isl_heap[0]
                heapq.heapreplace(self._isl_heap, (key + n, i))
            else:
                i = choose_endpoint(self._stats, self.balance, self._counter)
            self._counter += 1
            st = self._stats[i]
            st.dispatched_input_tokens += n
            st.pending += 1
        self._inbox.append((i, req))
        if not self._wake_scheduled:
            self._wake_scheduled = True
            if threading.get_ident() == self._loop_thread_id:  # from a callback: no self-pipe write
                self._loop.call_soon(self._drain_inbox)
            else:
                self._loop.call_soon_threadsafe(self._drain_inbox)

    def add_burst_listener(self, fn: Callable[[], None]) -> None:
        """Call ``fn()`` after each burst of callbacks (one response, one read of a stream, one
        batch of failures), so a caller can hand LoadGen a burst's completions at once
        (``rackbench.harness.EngineSUT``). Listeners run on the pool's thread."""
        self._burst_listeners.append(fn)

    def _burst_end(self) -> None:
        for fn in self._burst_listeners:
            fn()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ dispatch (loop thread)
    def _drain_inbox(self):
        self._wake_scheduled = False  # first: a submit racing with us schedules another drain
        touched = set()
        inbox = self._inbox
        while inbox:
            i, req = inbox.popleft()
            self._waiting[i].append(req)
            touched.add(i)
        for i in touched:
            self._start_requests(i)
        self._burst_end()  # requests failed at once (dead endpoints) were a burst too

    def _start_requests(self, i: int):
        st = self._stats[i]
        waiting = self._waiting[i]
        while waiting and st.open_requests < self.concurrency:
            if st.dead is not None and self.fail_dead_endpoints:
                while waiting:
                    self._fail(i, waiting.popleft(), EndpointError(self.urls[i], f"endpoint is down ({st.dead})"))
                return
            batch = [waiting.popleft()]
            while waiting and len(batch) < self.batch_size and batch[0].max_new_tokens == waiting[0].max_new_tokens:
                batch.append(waiting.popleft())
            st.open_requests += 1
            st.requests += 1
            if st._busy_since is None:
                st._busy_since = time.monotonic()
            self._loop.create_task(self._send(i, batch))

    def _body(self, batch: list[_Request]) -> dict:
        if self.api == "token_ids":
            prompts = [r.prompt if type(r.prompt) is list else list(r.prompt) for r in batch]
            # greedy; ids back in choices[].token_ids (trtllm_serve_1_2.yaml)
            extra = {"top_k": 1, "detokenize": False}
        else:
            prompts = [self.tokenizer.decode(list(r.prompt)) for r in batch]
            extra = {}
        body = {
            "model": self.model,
            "prompt": prompts[0] if len(prompts) == 1 else prompts,
            "max_tokens": batch[0].max_new_tokens,
            "stream": self.stream,
            "temperature": 0.0,
            **extra,
        }
        body.update(self.extra_body)
        return body

    def _tokens_of(self, choice: dict) -> list[int]:
        ids = choice.get("token_ids")
        if ids is not None:
            return list(ids)
        text = choice.get("text") or ""
        if self.tokenizer is None:
            raise ValueError("the server returned text without token_ids and the pool has no tokenizer")
        return self.tokenizer.encode(text) if text else []

    async def _send(self, i: int, batch: list[_Request]):
        url = self.urls[i]
        try:
            async with self._session.post(
                url + COMPLETIONS_ROUTE, data=_dumps(self._body(batch)), headers=_JSON_HEADERS
            ) as resp:
                if resp.status != 200:
                    detail = (await resp.text())[:500]
                    raise EndpointError(
                        url, f"HTTP {resp.status} from {COMPLETIONS_ROUTE}: {detail}", status=resp.status
                    )
                if self.stream:  # each sample completes as its choice finishes
                    await self._read_stream(i, url, resp, batch)
                    outputs = None
                else:
                    data = _loads(await resp.read())
                    outputs = self._outputs_of(url, data, len(batch))
        except Exception as exc:
            err = exc if isinstance(exc, EndpointError) else EndpointError(url, f"request failed: {exc!r}")
            if not (isinstance(exc, EndpointError) and exc.status is not None and exc.status < 500):
                self._mark_dead(i, str(err))  # a 4xx is this request's fault; anything else the server's
            self._finish_request(i)
            for r in batch:
                if not r.completed:  # a streamed sample whose choice finished keeps its result
                    self._fail(i, r, err)
            self._burst_end()
            return
        self._finish_request(i)
        if outputs is not None:
            for r, tokens in zip(batch, outputs):
                self._complete(i, r, tokens)
        if self._waiting[i]:
            self._start_requests(i)
        self._burst_end()

    def _outputs_of(self, url, data, n) -> list[list[int]]:
        if not isinstance(data, dict) or "choices" not in data:
            raise EndpointError(url, f"response has no choices: {str(data)[:300]}")
        out: list = [None] * n
        for choice in data["choices"]:
            idx = choice.get("index", 0)
            if not 0 <= idx < n:
                raise EndpointError(url, f"response choice index {idx} out of range for {n} prompt(s)")
            out[idx] = self._tokens_of(choice)
        if any(o is None for o in out):
            raise EndpointError(url, f"response answered {sum(o is not None for o in out)} of {n} prompts")
        return out

    def _complete(self, i: int, r: _Request, tokens: list[int]) -> None:
        st = self._stats[i]
        r.completed = True
        with self._lock:  # pending is also counted up by submit() on the caller's thread
            st.pending -= 1
        st.samples += 1
        st.input_tokens += len(r.prompt)
        st.output_tokens += len(tokens)
        if tokens and r.on_first_token is not None and not r.first_sent:
            r.first_sent = True
            r.on_first_token(tokens[0])
        r.on_done(tokens)

    def _stream_tokens(self, ids: list[int], texts: list[str]) -> list[int]:
        """A streamed choice's output ids: the server's, else its text re-encoded (as NVIDIA's client)."""
        if texts and not ids:
            return self.tokenizer.encode("".join(texts))
        return ids

    async def _read_stream(self, i: int, url, resp, batch: list[_Request]) -> None:
        """Reads the SSE stream; each prompt's sample completes when its choice's finish_reason
        comes, not when the whole request ends: in Server and Interactive a sample's latency
        (and so TPOT) is its own, whatever its request's other prompts still generate."""
        n = len(batch)
        ids: list[list[int]] = [[] for _ in range(n)]
        texts: list[list[str]] = [[] for _ in range(n)]
        done = False
        buf = b""
        async for data in resp.content.iter_any():  # whole reads, split here: far cheaper than readline
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if not line.startswith(b"data:"):
                    continue
                payload = line[5:].strip()
                if payload == b"[DONE]":
                    done = True
                    break
                self._stream_event(i, url, _loads(payload), batch, ids, texts)
            self._burst_end()  # this read's first tokens
            if done:
                break
        if not done and not all(r.completed for r in batch):
            raise EndpointError(url, "stream ended before every prompt finished (server died?)")
        for idx, r in enumerate(batch):  # [DONE] without a finish_reason for some choice
            if not r.completed:
                self._complete(i, r, self._stream_tokens(ids[idx], texts[idx]))

    def _stream_event(self, i, url, obj, batch, ids, texts):
        n = len(batch)
        if "error" in obj or obj.get("object") == "error":
            raise EndpointError(url, f"stream error: {str(obj)[:300]}")
        for choice in obj.get("choices") or ():
            idx = choice.get("index", 0)
            if not 0 <= idx < n:
                raise EndpointError(url, f"stream choice index {idx} out of range for {n} prompt(s)")
            chunk_ids = choice.get("token_ids")
            first = None
            if chunk_ids is not None:
                ids[idx].extend(chunk_ids)
                first = chunk_ids[0] if chunk_ids else None
            else:
                text = choice.get("text") or ""
                if text:
                    texts[idx].append(text)
                if text and not batch[idx].first_sent:
                    if self.tokenizer is None:
                        raise EndpointError(url, "stream carries text without token_ids and the pool has no tokenizer")
                    enc = self.tokenizer.encode(text)
                    first = enc[0] if enc else None
            req = batch[idx]
            if first is not None and not req.first_sent:
                req.first_sent = True
                if req.on_first_token is not None:
                    req.on_first_token(first)
            if choice.get("finish_reason") is not None and not req.completed:
                self._complete(i, req, self._stream_tokens(ids[idx], texts[idx]))

    def _finish_request(self, i):
        st = self._stats[i]
        st.open_requests -= 1
        if st.open_requests == 0 and st._busy_since is not None:
            st.busy_s += time.monotonic() - st._busy_since
            st._busy_since = None

    def _fail(self, i, req: _Request, err: BaseException):
        st = self._stats[i]
        st.errors += 1
        with self._lock:
            st.pending -= 1
        req.on_error(err)

    def _mark_dead(self, i, why: str):
        if self._stats[i].dead is None:
            self._stats[i].dead = why
            self._any_dead = True
        waiting = self._waiting[i]
        if self.fail_dead_endpoints:
            while waiting:
                self._fail(i, waiting.popleft(), EndpointError(self.urls[i], f"endpoint is down ({why})"))

    # ------------------------------------------------------------------ readiness and outputs
    def wait_ready(
        self, timeout: float, *, poll_interval: float = 0.5, alive: Callable[[str], str | None] | None = None
    ) -> None:
        """Block until every endpoint's /health answers 200, or raise EndpointError within ``timeout``.

        ``alive(url)`` (from the launcher) returns why an endpoint's server process is
        gone, or None; a dead process fails at once instead of waiting for the timeout."""
        self._call(
            wait_ready(self.urls, timeout, session=self._session, poll_interval=poll_interval, alive=alive),
            timeout=timeout + 30,
        )

    def stats(self) -> list[dict]:
        """Per-endpoint counters (thread-safe snapshot)."""
        return self._call(self._snapshot(), timeout=30) if not self._closed else [s.public() for s in self._stats]

    async def _snapshot(self):
        return [s.public() for s in self._stats]

    def write_stats(self, path) -> None:
        from rackbench.atomic import atomic_path

        rows = self.stats()
        with atomic_path(path) as tmp:
            Path(tmp).write_text(
                json.dumps(
                    {"balance": self.balance, "stream": self.stream, "api": self.api, "endpoints": rows}, indent=2
                )
                + "\n"
            )


async def wait_ready(
    urls: Sequence[str],
    timeout: float,
    *,
    session: aiohttp.ClientSession | None = None,
    poll_interval: float = 0.5,
    alive: Callable[[str], str | None] | None = None,
) -> None:
    """Poll each URL's /health until 200; EndpointError naming what is not ready after ``timeout`` s."""
    own = session is None
    if own:
        session = aiohttp.ClientSession()
    deadline = time.monotonic() + timeout
    last: dict[str, str] = {u: "no answer yet" for u in urls}
    pending = [u.rstrip("/") for u in urls]
    try:
        while pending:
            for url in list(pending):
                why_dead = alive(url) if alive else None
                if why_dead:
                    raise EndpointError(url, f"server exited before it became ready: {why_dead}")
                try:
                    per_try = max(0.1, min(5.0, deadline - time.monotonic()))
                    async with session.get(url + HEALTH_ROUTE, timeout=aiohttp.ClientTimeout(total=per_try)) as r:
                        if r.status == 200:
                            pending.remove(url)
                            continue
                        last[url] = f"/health answered HTTP {r.status}"
                except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                    last[url] = f"/health: {type(exc).__name__}: {exc}"
            if not pending:
                break
            if time.monotonic() >= deadline:
                detail = "; ".join(f"{u} ({last.get(u)})" for u in pending[:3])
                if len(pending) > 3:
                    detail += f"; and {len(pending) - 3} more"
                raise EndpointError(
                    pending[0], f"not ready after {timeout:g} s: {len(pending)} endpoint(s) not ready: {detail}"
                )
            await asyncio.sleep(min(poll_interval, max(0.0, deadline - time.monotonic())))
    finally:
        if own:
            await session.close()


class _Tokenizer:
    """decode/encode with no special tokens added (outputs are continuations)."""

    def __init__(self, tok):
        self._tok = tok

    def encode(self, text: str) -> list[int]:
        if hasattr(self._tok, "encode") and type(self._tok).__module__.startswith("tokenizers"):
            return self._tok.encode(text, add_special_tokens=False).ids
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)


def _as_tokenizer(tok):
    if isinstance(tok, (str, Path)):
        path = Path(tok)
        path = path / "tokenizer.json" if path.is_dir() else path
        from tokenizers import Tokenizer

        return _Tokenizer(Tokenizer.from_file(str(path)))
    return tok if isinstance(tok, _Tokenizer) else _Tokenizer(tok)

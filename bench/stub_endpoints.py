"""Zero-cost OpenAI-compatible completion endpoints for benchmarking the rack client.

One process serves any number of ports from one event loop (uvloop where installed) with a
minimal asyncio protocol: HTTP/1.1 keep-alive, ``GET /health`` and ``POST /v1/completions``
in the shape ``rackbench.serve`` and trtllm-serve answer (token ids in, ``choices[].token_ids``
out; streamed as Server-Sent Events in a chunked body: one chunk with each prompt's first
token, then one with the rest and ``finish_reason``, then ``data: [DONE]``). It exists so
the benchmark measures the client, not the server: the stubs share the client's 2 cores, and
aiohttp's server costs several times more per request. It is not the product's server
(that is ``rackbench.serve``, on aiohttp) and is never used for results.

Each answer is ``min(max_tokens, output_len)`` tokens: the prompt's last id plus 1, 2, ...
(``expected_tokens``), the rule of ``rackbench.serve.InstantEngine``, so a benchmark can check
that what LoadGen recorded is what the stub sent.

    python bench/stub_endpoints.py --output-len 2 --port P [--port P ...]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import socket
import sys
from pathlib import Path

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

from rackbench.endpoints import new_event_loop  # noqa: E402

_HEALTH = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nOK"
_JSON_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
_SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)
_NOT_FOUND = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"


def expected_tokens(prompt: list[int], max_tokens: int, output_len: int) -> list[int]:
    last = prompt[-1] if prompt else 0
    return [last + i + 1 for i in range(min(max_tokens, output_len))]


def _chunk(payload: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(payload), payload)


class StubProtocol(asyncio.Protocol):
    output_len = 2

    def connection_made(self, transport):
        self.transport = transport
        self.buf = b""

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        while True:
            head_end = buf.find(b"\r\n\r\n")
            if head_end < 0:
                break
            head = buf[:head_end]
            length = 0
            k = head.find(b"Content-Length:")
            if k < 0:
                k = head.lower().find(b"content-length:")
            if k >= 0:
                e = head.find(b"\r\n", k)
                length = int(head[k + 15 : e if e >= 0 else len(head)])
            end = head_end + 4 + length
            if len(buf) < end:
                break
            body = buf[head_end + 4 : end]
            buf = buf[end:]
            self.handle(head, body)
        self.buf = buf

    def handle(self, head: bytes, body: bytes):
        write = self.transport.write
        if head.startswith(b"GET /health"):
            write(_HEALTH)
            return
        if not head.startswith(b"POST /v1/completions"):
            write(_NOT_FOUND)
            return
        req = orjson.loads(body)
        prompt = req["prompt"]
        prompts = [prompt] if prompt and type(prompt[0]) is int else prompt
        max_tokens = req.get("max_tokens") or 16
        n = min(max_tokens, self.output_len)
        outs = [[p[-1] + i + 1 for i in range(n)] for p in prompts]
        reason = "length" if n >= max_tokens else "stop"
        if not req.get("stream"):
            payload = orjson.dumps(
                {
                    "object": "text_completion",
                    "choices": [
                        {"index": i, "text": "", "token_ids": t, "finish_reason": reason} for i, t in enumerate(outs)
                    ],
                }
            )
            write(_JSON_HEAD % len(payload) + payload)
            return
        events = []
        for i, t in enumerate(outs):
            events.append(b"data: " + orjson.dumps({"choices": [{"index": i, "text": "", "token_ids": t[:1]}]}))
        for i, t in enumerate(outs):
            events.append(
                b"data: "
                + orjson.dumps({"choices": [{"index": i, "text": "", "token_ids": t[1:], "finish_reason": reason}]})
            )
        events.append(b"data: [DONE]")
        write(_SSE_HEAD + _chunk(b"\n\n".join(events) + b"\n\n") + b"0\r\n\r\n")


async def serve(ports: list[int], host: str, output_len: int):
    StubProtocol.output_len = output_len
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    servers = []
    for port in ports:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        servers.append(await loop.create_server(StubProtocol, sock=sock, backlog=1024))
    print(f"stub_endpoints: {len(ports)} ports ready (pid {os.getpid()})", file=sys.stderr, flush=True)
    await stop.wait()
    for s in servers:
        s.close()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, action="append", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--output-len", type=int, default=2)
    args = p.parse_args(argv)
    loop = new_event_loop()
    try:
        loop.run_until_complete(serve(args.port, args.host, args.output_len))
    finally:
        loop.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A count-only Fiddler v3 sink for benchmarks, meant to run in a process of its own.

It answers the model lookups and counts the events of ``POST``/``PATCH /v3/events`` without
storing them, over a minimal keep-alive HTTP/1.1 loop, so that the client, not the sink, is
what a benchmark measures. ``--delay`` holds every publish answer (a slow backend).

    python -m benchmarks.sink --port 0    # prints "listening http://127.0.0.1:PORT"
"""

from __future__ import annotations

import argparse
import asyncio
import uuid

import orjson

PROJECT = {"id": str(uuid.uuid4()), "name": "bank_churn"}
MODEL = {
    "id": str(uuid.uuid4()),
    "name": "bank_churn",
    "version": "v1",
    "project": PROJECT,
    "schema": {"columns": []},
    "event_id_col": "event_id",
    "event_ts_col": "timestamp",
    "event_ts_format": None,
}


def _page(items: list[object]) -> dict[str, object]:
    return {
        "data": {"total": len(items), "items": items},
        "api_version": "3.0",
        "kind": "PAGINATED",
    }


class Sink:
    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.events = 0
        self.requests = 0

    async def answer(self, method: str, path: str, body: bytes) -> tuple[int, bytes]:
        route = path.split("?", 1)[0]
        if route == "/v3/projects":
            return 200, orjson.dumps(_page([PROJECT]))
        if route == "/v3/models":
            return 200, orjson.dumps(_page([{"id": MODEL["id"], "name": "bank_churn"}]))
        if route == f"/v3/models/{MODEL['id']}":
            return 200, orjson.dumps({"data": MODEL, "api_version": "3.0", "kind": "NORMAL"})
        if route == "/v3/events" and method in ("POST", "PATCH"):
            count = len(orjson.loads(body)["source"]["events"])
            if self.delay:
                await asyncio.sleep(self.delay)
            self.events += count
            self.requests += 1
            return 202, b'{"data":{"source_type":"EVENTS","event_ids":[]},"kind":"NORMAL"}'
        if route == "/stats":
            return 200, orjson.dumps({"events": self.events, "requests": self.requests})
        return 404, b'{"error":{"code":404,"message":"not found","errors":[]}}'

    async def connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                length = 0
                for line in lines[1:]:
                    if line[:15].lower() == "content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                status, payload = await self.answer(method, path, body)
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (status, len(payload), payload)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay", type=float, default=0.0)
    args = parser.parse_args()
    sink = Sink(args.delay)
    server = await asyncio.start_server(sink.connection, "127.0.0.1", args.port)
    port = server.sockets[0].getsockname()[1]
    print(f"listening http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())

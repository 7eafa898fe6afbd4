"""Load test of `cliptune serve`: N concurrent clients for T seconds against a server on loopback.

The server runs as `python -m cliptune serve INDEX` in its own process (as a user runs it); each
client is a thread with one keep-alive connection that sends text queries one after another
(`GET /api/search?q=...&k=...`), and with `--thumbs` then fetches every result's thumbnail, as the
page does. A warm-up (not counted) makes the thumbnails and loads the model's caches first.
Reports requests/s, p50/p99 latency and errors per kind of request, with the CPU it ran on.

    python benchmarks/serve_load.py INDEX [--clients 8] [--seconds 10] [--k 24] [--thumbs]
                                    [--captions ../shared/data/coco-mini/captions_val.json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

import numpy as np

# Used when no --captions file is given: everyday photo searches.
QUERIES = [
    "a dog on a couch", "people on a beach", "a plate of food", "a city street at night", "a cat sleeping",
    "a man riding a bike", "a red car", "children playing football", "a kitchen with a window", "a train station",
    "a bowl of fruit", "two people talking", "a bird on a branch", "a snowy mountain", "a laptop on a desk",
    "a boat on the water", "a pizza", "a bus on the road", "a giraffe", "a living room with a television",
]


@dataclass
class Tally:
    latencies_ms: dict[str, list[float]] = field(default_factory=lambda: {"search": [], "thumb": []})
    errors: dict[str, int] = field(default_factory=lambda: {"search": 0, "thumb": 0})
    first_errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, ms: float, error: str | None) -> None:
        with self.lock:
            if error is None:
                self.latencies_ms[kind].append(ms)
            else:
                self.errors[kind] += 1
                if len(self.first_errors) < 5:
                    self.first_errors.append(f"{kind}: {error}")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def read_queries(captions: str | None) -> list[str]:
    """Captions of a COCO captions JSON (a realistic mix of queries), or the built-in list."""
    if not captions:
        return list(QUERIES)
    data = json.loads(Path(captions).read_text(encoding="utf-8"))
    return [a["caption"].strip() for a in data["annotations"] if a["caption"].strip()]


def start_server(index: Path, port: int) -> subprocess.Popen:
    import cliptune

    env = dict(os.environ)
    # The server runs the same cliptune this script imported (a source checkout included).
    source = str(Path(cliptune.__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [env.get("PYTHONPATH")])])
    return subprocess.Popen([sys.executable, "-m", "cliptune", "serve", str(index), "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def wait_until_up(port: int, server: subprocess.Popen, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited ({server.returncode}):\n{server.stdout.read()}")
        try:
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            connection.request("GET", "/api/info")
            if connection.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"the server did not answer on port {port} within {timeout:.0f} s")


def client(port: int, queries: list[str], offset: int, k: int, thumbs: bool, until: float, tally: Tally) -> None:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    step = offset
    while time.monotonic() < until:
        query = queries[step % len(queries)]
        step += 1
        urls = []
        start = time.perf_counter()
        try:
            connection.request("GET", f"/api/search?q={quote(query)}&k={k}")
            response = connection.getresponse()
            body = response.read()
            error = None if response.status == 200 else f"{response.status} {body[:200]!r}"
            if error is None:
                urls = [hit["thumb"] for hit in json.loads(body)["results"]]
        except (OSError, http.client.HTTPException, ValueError) as err:
            error = f"{type(err).__name__}: {err}"
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        tally.add("search", 1000 * (time.perf_counter() - start), error)
        for url in urls if thumbs else []:
            if time.monotonic() >= until:
                break
            start = time.perf_counter()
            try:
                connection.request("GET", url)
                response = connection.getresponse()
                body = response.read()
                error = None if response.status == 200 and body[:2] == b"\xff\xd8" else f"{response.status}"
            except (OSError, http.client.HTTPException) as err:
                error = f"{type(err).__name__}: {err}"
                connection.close()
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            tally.add("thumb", 1000 * (time.perf_counter() - start), error)
    connection.close()


def hammer(port: int, queries: list[str], clients: int, seconds: float, k: int, thumbs: bool) -> Tally:
    tally = Tally()
    until = time.monotonic() + seconds
    step = max(1, len(queries) // clients)
    threads = [threading.Thread(target=client, args=(port, queries, i * step, k, thumbs, until, tally))
               for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return tally


def run_load(index: Path, clients: int = 8, seconds: float = 10.0, k: int = 24, thumbs: bool = False,
             captions: str | None = None, warmup: float = 2.0) -> dict:
    if clients < 1 or seconds <= 0 or k < 1 or warmup < 0:
        raise SystemExit("serve_load: --clients and --k must be >= 1, --seconds > 0, --warmup >= 0")
    if not (Path(index) / "meta.json").is_file():
        raise SystemExit(f"serve_load: {index} is not an index (no meta.json)")
    queries = read_queries(captions)
    port = free_port()
    server = start_server(Path(index), port)
    try:
        started = time.perf_counter()
        wait_until_up(port, server)
        startup = time.perf_counter() - started
        if warmup:
            hammer(port, queries, clients, warmup, k, thumbs)
        tally = hammer(port, queries, clients, seconds, k, thumbs)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
    kinds = {}
    for kind, latencies in tally.latencies_ms.items():
        if not latencies and not tally.errors[kind]:
            continue
        p50, p99 = np.percentile(latencies, [50, 99]) if latencies else (float("nan"), float("nan"))
        kinds[kind] = {"requests": len(latencies), "errors": tally.errors[kind],
                       "requests_per_s": round(len(latencies) / seconds, 1),
                       "p50_ms": round(float(p50), 1), "p99_ms": round(float(p99), 1)}
    meta = json.loads((Path(index) / "meta.json").read_text(encoding="utf-8"))
    return {"cpu": cpu_model(), "cpu_cores": os.cpu_count(), "index_photos": len(meta["paths"]),
            "embedder": meta["embedder"]["kind"], "clients": clients, "seconds": seconds, "k": k,
            "thumbs": thumbs, "queries": len(queries), "server_startup_s": round(startup, 1),
            "requests": sum(v["requests"] for v in kinds.values()),
            "requests_per_s": round(sum(v["requests"] for v in kinds.values()) / seconds, 1),
            "errors": sum(tally.errors.values()), "first_errors": tally.first_errors, "by_kind": kinds}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("index", type=Path, help="index folder from `cliptune index`")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients (default: 8)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured duration (default: 10)")
    parser.add_argument("--k", type=int, default=24, help="results per query (default: 24, the page's)")
    parser.add_argument("--thumbs", action="store_true", help="after each search, fetch its thumbnails")
    parser.add_argument("--captions", help="COCO captions JSON whose captions are the queries")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring (default: 2)")
    args = parser.parse_args(argv)
    result = run_load(args.index, args.clients, args.seconds, args.k, args.thumbs, args.captions, args.warmup)
    print(json.dumps(result, indent=2))
    print(f"\nCPU: {result['cpu']} ({result['cpu_cores']} cores), {result['clients']} clients x "
          f"{result['seconds']:g} s, {result['index_photos']} photos, {result['embedder']} embedder")
    print("| request | requests | requests/s | p50 (ms) | p99 (ms) | errors |")
    print("| --- | --- | --- | --- | --- | --- |")
    for kind, row in result["by_kind"].items():
        print(f"| {kind} | {row['requests']} | {row['requests_per_s']} | {row['p50_ms']} | {row['p99_ms']} | "
              f"{row['errors']} |")
    return result


if __name__ == "__main__":
    main()

"""Memory after bursts: rounds of concurrent streamed requests, most cancelled by the client after a few events.

Starts ``agentspec serve`` on the default model, records the server's RSS before the first round, its
peak (sampled every 50 ms) and after each round once the server is idle again::

    python scripts/burst.py --rounds 7 --concurrency 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import socket
import subprocess
import sys
import threading
import time

import httpx


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS:"))


async def one(client: httpx.AsyncClient, url: str, cancel_after: int | None, i: int, topic: int | None) -> str:
    number = i if topic is None else topic
    body = {"model": "m", "stream": True, "max_tokens": 32, "temperature": 0.7, "seed": i,
            "messages": [{"role": "user", "content": f"Write a short poem about the number {number}."}]}
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                return str(response.status_code)
            events = 0
            async for line in response.aiter_lines():
                if line.startswith("data: "):
                    events += 1
                    if cancel_after is not None and events >= cancel_after:
                        return "cancelled"
            return "finished"
    except httpx.HTTPError as exc:
        return type(exc).__name__


async def burst(url: str, n: int, cancel_share: float, rnd: random.Random, same: bool = False) -> dict[str, int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        plans = [rnd.randint(2, 4) if rnd.random() < cancel_share else None for _ in range(n)]
        outcomes = await asyncio.gather(*(one(client, url, plan, i, 7 if same else None)
                                          for i, plan in enumerate(plans)))
    counts: dict[str, int] = {}
    for outcome in outcomes:
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def wait_idle(url: str, timeout: float = 600) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "/health", timeout=5).json()["in_flight"] == 0:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the server did not become idle")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--cancel-share", type=float, default=0.9, help="share of streams cancelled after 2-4 events")
    parser.add_argument("--same-prompt", action="store_true",
                        help="every request the same prompt (the prefix-KV cache then holds one; by default each "
                             "prompt is new and the cache fills up to its budget)")
    parser.add_argument("--settle", type=float, default=2.0, help="seconds idle before reading RSS after a round")
    args, serve_args = parser.parse_known_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "agentspec.cli", "serve", "--port", str(port), "--served-model-name", "m",
               "--max-queue", str(args.concurrency + 8), *serve_args]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    peak = [0]
    stop = threading.Event()
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"the server exited ({server.returncode}): {' '.join(command)}")
            try:
                httpx.get(url + "/health", timeout=2)
                break
            except httpx.HTTPError:
                time.sleep(0.5)
        warm = asyncio.run(burst(url, 4, 0.0, random.Random(0)))  # first-request costs out of the figures
        wait_idle(url)
        time.sleep(args.settle)
        before = rss(server.pid)

        def sample() -> None:
            while not stop.is_set():
                peak[0] = max(peak[0], rss(server.pid))
                time.sleep(0.05)

        threading.Thread(target=sample, daemon=True).start()
        print(f"warm-up {warm}; RSS before: {before / 2**20:.0f} MiB", flush=True)
        rnd = random.Random(1)
        for r in range(args.rounds):
            counts = asyncio.run(burst(url, args.concurrency, args.cancel_share, rnd, args.same_prompt))
            wait_idle(url)
            time.sleep(args.settle)
            print(f"round {r + 1}: {counts}; RSS after {rss(server.pid) / 2**20:.0f} MiB, peak so far "
                  f"{peak[0] / 2**20:.0f} MiB", flush=True)
        after = rss(server.pid)
        health = httpx.get(url + "/health", timeout=5).json()
        print(f"RSS before {before / 2**20:.0f} MiB, peak {peak[0] / 2**20:.0f} MiB, after {after / 2**20:.0f} MiB "
              f"({(after - before) / before:+.1%}); health {health}")
    finally:
        stop.set()
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()

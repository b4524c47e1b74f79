"""Fetch many URLs concurrently with a per-host limit, retries and a global timeout.

    python fetch_all.py urls.txt --concurrency 20 --per-host 4 --out results.jsonl
"""

import argparse
import asyncio
import json
import random
import time
from collections import defaultdict
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp


@dataclass
class Result:
    url: str
    status: int | None
    bytes: int
    seconds: float
    attempts: int
    error: str | None = None


class HostLimiter:
    """At most `limit` requests in flight per host name."""

    def __init__(self, limit: int) -> None:
        self._semaphores = defaultdict(lambda: asyncio.Semaphore(limit))

    def __call__(self, url: str) -> asyncio.Semaphore:
        return self._semaphores[urlsplit(url).hostname or ""]


RETRY_STATUSES = {429, 500, 502, 503, 504}


async def fetch(session: aiohttp.ClientSession, url: str, limiter: HostLimiter,
                retries: int = 3) -> Result:
    started = time.perf_counter()
    last_error = None
    for attempt in range(1, retries + 2):
        try:
            async with limiter(url):
                async with session.get(url, allow_redirects=True) as response:
                    body = await response.read()
                    if response.status in RETRY_STATUSES and attempt <= retries:
                        retry_after = response.headers.get("Retry-After")
                        delay = float(retry_after) if retry_after and retry_after.isdigit() else None
                        raise _Retry(f"HTTP {response.status}", delay)
                    return Result(url, response.status, len(body), time.perf_counter() - started, attempt)
        except _Retry as exc:
            last_error = str(exc)
            await asyncio.sleep(exc.delay if exc.delay is not None else backoff(attempt))
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            last_error = f"{type(exc).__name__}: {exc}"
            if attempt > retries:
                break
            await asyncio.sleep(backoff(attempt))
    return Result(url, None, 0, time.perf_counter() - started, attempt, last_error)


class _Retry(Exception):
    def __init__(self, message: str, delay: float | None) -> None:
        super().__init__(message)
        self.delay = delay


def backoff(attempt: int, base: float = 0.5, cap: float = 10.0) -> float:
    """Exponential backoff with full jitter."""
    return random.uniform(0, min(cap, base * 2 ** attempt))


async def run(urls: list[str], concurrency: int, per_host: int, timeout: float) -> list[Result]:
    limiter = HostLimiter(per_host)
    connector = aiohttp.TCPConnector(limit=concurrency)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    queue: asyncio.Queue[str] = asyncio.Queue()
    for url in urls:
        queue.put_nowait(url)
    results: list[Result] = []

    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout,
                                     headers={"User-Agent": "fetch-all/1.0"}) as session:
        async def worker() -> None:
            while True:
                try:
                    url = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                results.append(await fetch(session, url, limiter))
                queue.task_done()

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("urls", help="file with one URL per line")
    parser.add_argument("--concurrency", type=int, default=10)
    parser.add_argument("--per-host", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=30.0)
    parser.add_argument("--out", default="results.jsonl")
    args = parser.parse_args()

    with open(args.urls, encoding="utf-8") as fh:
        urls = [line.strip() for line in fh if line.strip() and not line.startswith("#")]
    results = asyncio.run(run(urls, args.concurrency, args.per_host, args.timeout))
    ok = sum(1 for r in results if r.status and r.status < 400)
    with open(args.out, "w", encoding="utf-8") as out:
        for r in sorted(results, key=lambda r: r.url):
            out.write(json.dumps(r.__dict__) + "\n")
    print(f"{ok}/{len(results)} succeeded; details in {args.out}")


if __name__ == "__main__":
    main()

"""Requests/s and tokens/s through `toolkit serve` at 1, 8 and 32 concurrent clients, against
the same requests made in-process from as many threads.

    python benchmarks/serving.py [--model tiny-code] [--requests 64] [--tokens 64]

Each request: a 20-token prompt, `--tokens` new tokens (ignore_eos), sampling with its own
seed, logprobs with top-5 alternatives (what a notebook user asks for). The server is the
command a user runs (`toolkit serve`, a process of its own) with the decode step compiled
(the benchmark compiles it first, so the server finds it on disk); clients are httpx
clients on threads, whole responses and streams. In-process, the model is loaded as
`toolkit serve` loads it (off the main thread) and each thread calls `create`, with the
callers stepping the engine (the default) or its driver thread (`Engine.driven`, as the
server runs it). Prints a
table; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from pathlib import Path

import httpx
import torch

import toolkit as tk

PROMPT = 'def parse_header(line):\n    """Split a header line into its name and value."""\n'


def request(k: int, tokens: int) -> dict:
    return dict(prompt=PROMPT, max_tokens=tokens, ignore_eos=True, temperature=1.0, seed=k,
                logprobs=True, top_logprobs=5)


def run(clients: int, count: int, call) -> tuple[float, float]:
    """(requests/s, tokens/s) of `count` calls made by `clients` threads."""
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        tokens = sum(pool.map(call, range(count)))
    elapsed = time.perf_counter() - start
    return count / elapsed, tokens / elapsed


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-code")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "serving.json")
    args = parser.parse_args()

    loaded = []                    # off the main thread, as `toolkit serve` loads it
    loader = threading.Thread(target=lambda: loaded.append(tk.load(args.model, device="cpu",
                                                                   progress=False)))
    loader.start()
    loader.join()
    llm = loaded[0]
    step = llm.engine.runner.step
    assert step is None or step.wait(), "the decode step did not compile"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "toolkit.cli", "serve", args.model,
                               "--port", str(port), "--log-level", "warning",
                               "--max-concurrent", str(max(args.clients))],
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    url = f"http://127.0.0.1:{port}/v1/completions"
    local = threading.local()

    def client() -> httpx.Client:
        if not hasattr(local, "client"):
            local.client = httpx.Client(timeout=600)
        return local.client

    def http(k: int) -> int:
        resp = client().post(url, json=request(k, args.tokens))
        resp.raise_for_status()
        return resp.json()["usage"]["completion_tokens"]

    def http_stream(k: int) -> int:
        tokens = 0
        with client().stream("POST", url, json={**request(k, args.tokens),
                                                "stream": True}) as resp:
            for line in resp.iter_lines():
                if line.startswith("data: {"):
                    tokens += len(json.loads(line[6:])["choices"][0]["logprobs"]["content"])
        return tokens

    def in_process(k: int) -> int:
        return llm.completions.create(**request(k, args.tokens)).usage.completion_tokens

    try:
        deadline = time.monotonic() + 300
        while True:                # up, and its step loaded from disk: warm it
            try:
                for k in range(8):
                    http(k)
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline
                time.sleep(0.5)
        run(1, 4, in_process)      # (on a pool thread: this one never runs torch code)
        rows = []
        for clients in args.clients:
            for mode, call in (("in-process", in_process), ("in-process driven", in_process),
                               ("HTTP", http), ("HTTP stream", http_stream)):
                with llm.engine.driven() if mode.endswith("driven") else nullcontext():
                    rps, tps = run(clients, args.requests, call)
                rows.append(dict(clients=clients, mode=mode, requests_per_s=round(rps, 2),
                                 tokens_per_s=round(tps, 1)))
                print(f"{clients:>3} clients  {mode:<17} {rps:7.2f} req/s {tps:8.1f} tok/s",
                      flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    result = dict(model=args.model, requests=args.requests, tokens=args.tokens,
                  machine=f"{platform.processor() or platform.machine()}, "
                          f"{os.cpu_count()} cores, torch {torch.__version__}",
                  rows=rows)
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

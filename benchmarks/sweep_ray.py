"""Sweep throughput here against a local Ray cluster on the same machine.

    python benchmarks/sweep_ray.py [--model tiny-code] [--workers 2] [--n 8] [--tokens 32]

A 4 x 4 grid of temperature and top_p on one prompt, `--n` choices of `--tokens` tokens
each, run by `tk.sweep` in this process and with `executor=RayExecutor(workers=...)`, in
the same batches of settings (64 rows each: two batches at n=8, one per worker). Both eager
(`compile=False`), so that the frames compare bit for bit; the script checks they are
equal. Prints completions/s; writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import ray
import torch

import toolkit as tk
from toolkit.cluster import RayExecutor

PROMPT = 'def parse_header(line):\n    """Split a header line into its name and value."""\n'
GRID = dict(temperature=[0.3, 0.7, 1.0, 1.3], top_p=[0.5, 0.8, 0.95, 1.0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-code")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--n", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker; default: as many as here (then the "
                             "frames are bit-identical, which is checked)")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "sweep_ray.json")
    args = parser.parse_args()
    llm = tk.load(args.model, compile=False, progress=False)
    sweep = lambda **kw: tk.sweep(llm, PROMPT, n=args.n, max_tokens=args.tokens, seed=0,
                                  progress=False, **GRID, **kw)
    completions = args.n * len(GRID["temperature"]) * len(GRID["top_p"])

    sweep()                                    # warm-up
    start = time.perf_counter()
    local = sweep()
    local_s = time.perf_counter() - start

    ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             logging_level="ERROR")
    executor = RayExecutor(workers=args.workers, threads=args.threads)
    start = time.perf_counter()
    on_ray = sweep(executor=executor)          # the workers start and load the model
    cold_s = time.perf_counter() - start
    start = time.perf_counter()
    on_ray = sweep(executor=executor)          # the same engines, warm
    warm_s = time.perf_counter() - start
    executor.close()
    ray.shutdown()
    same = on_ray.equals(local)
    assert same or args.threads, "the Ray sweep's frame differs from the local one"
    rows = {"local": completions / local_s, "ray, first sweep (workers start)":
            completions / cold_s, "ray, second sweep (warm workers)": completions / warm_s}
    for name, rate in rows.items():
        print(f"{name:<40} {rate:8.1f} completions/s")
    print("frames bit-identical:", same)
    result = dict(model=args.model, workers=args.workers, n=args.n, tokens=args.tokens,
                  threads_per_worker=args.threads or torch.get_num_threads(), identical=same,
                  settings=len(GRID["temperature"]) * len(GRID["top_p"]),
                  machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} "
                          f"cores, torch {torch.__version__}, ray {ray.__version__}",
                  completions_per_s={k: round(v, 2) for k, v in rows.items()})
    args.out.parent.mkdir(exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Decode speed against `transformers` `generate()`, same model, prompt and run.

    python benchmarks/cpu_decode.py [--model tiny-code] [--tokens 128] [--repeats 5]

Batch 1: the engine runs with everything a notebook user turns on (logprobs, top-5
alternatives, last activations), as loaded by default (once its decode step has compiled
in the background) and with `compile=False`; `generate()` runs plain greedy decoding, its
fastest configuration. Batches: n=8 and n=64 choices sampled at temperature 1 with
logprobs and top-5, against `generate(num_return_sequences=n)` sampling (no logprobs),
64 new tokens each, the two timed alternately. Every run produces exactly the tokens
asked for. Prints tokens/s and the ratios; writes JSON to benchmarks/results/. DESIGN §8
target on CPU: batch-1 ratio >= 2.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import toolkit as tk

PROMPT = 'def parse_header(line):\n    """Split a header line into its name and value."""\n'


def alternate_rates(fns: dict, tokens: int, repeats: int) -> dict:
    """Tokens/s of each fn, median of `repeats` runs taken in turns after a warm-up run
    (allocations, lazy init); on a noisy machine, alternating keeps a slow spell from
    landing on one side only."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():
        fn()
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: tokens / statistics.median(t) for name, t in times.items()}


def best_rate(fn, tokens: int, repeats: int) -> float:
    """Tokens/s of one fn, median of `repeats` runs after a warm-up run."""
    return alternate_rates({"fn": fn}, tokens, repeats)["fn"]


def batch_rates(llm: tk.LLM, ids: torch.Tensor, n: int, tokens: int, repeats: int) -> dict:
    """n sampled choices: the engine with logprobs and top-5, `generate()` without."""
    def engine() -> None:
        resp = llm.completions.create(prompt=PROMPT, max_tokens=tokens, n=n, seed=0,
                                      temperature=1.0, ignore_eos=True, logprobs=True,
                                      top_logprobs=5)
        assert resp.usage.completion_tokens == n * tokens

    def generate() -> None:
        with torch.inference_mode():
            out = llm.model.generate(ids, max_new_tokens=tokens, min_new_tokens=tokens,
                                     do_sample=True, num_return_sequences=n,
                                     pad_token_id=llm.info.eos_token_ids[0])
        assert out.shape == (n, ids.shape[1] + tokens)

    rates = alternate_rates({"engine": engine, "generate": generate}, n * tokens, repeats)
    return {"engine_tokens_per_s": round(rates["engine"], 1),
            "generate_tokens_per_s": round(rates["generate"], 1),
            "ratio": round(rates["engine"] / rates["generate"], 2)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="tiny-code")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "cpu_decode.json")
    args = parser.parse_args()

    start = time.perf_counter()
    llm = tk.load(args.model, device=args.device)
    step = getattr(llm.engine.runner, "step", None)      # compiles in the background
    compiled = step is not None and step.wait()
    compile_s = time.perf_counter() - start
    eager = tk.load(args.model, device=args.device, compile=False)
    ids = torch.tensor([llm.tokenizer(PROMPT)["input_ids"]], device=llm.device)

    def engine(target: tk.LLM = llm) -> None:
        resp = target.completions.create(prompt=PROMPT, max_tokens=args.tokens,
                                         temperature=0, ignore_eos=True, logprobs=True,
                                         top_logprobs=5, include_last_activation=True)
        assert resp.usage.completion_tokens == args.tokens

    def generate() -> None:
        with torch.inference_mode():
            out = llm.model.generate(ids, max_new_tokens=args.tokens,
                                     min_new_tokens=args.tokens, do_sample=False,
                                     pad_token_id=llm.info.eos_token_ids[0])
        assert out.shape[1] - ids.shape[1] == args.tokens

    engine_rate = best_rate(engine, args.tokens, args.repeats)
    eager_rate = best_rate(lambda: engine(eager), args.tokens, args.repeats)
    generate_rate = best_rate(generate, args.tokens, args.repeats)
    result = {
        "model": llm.name, "parameters": llm.info.num_parameters,
        "runner": type(llm.engine.runner).__name__,
        "compiled_step": compiled,
        "device": str(llm.device),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "torch": torch.__version__, "new_tokens": args.tokens,
        "engine_tokens_per_s": round(engine_rate, 1),
        "generate_tokens_per_s": round(generate_rate, 1),
        "ratio": round(engine_rate / generate_rate, 2),
        "load_to_compiled_s": round(compile_s, 1),
        "engine_eager_tokens_per_s": round(eager_rate, 1),
    }
    for n in (8, 64):
        result[f"n{n}"] = batch_rates(llm, ids, n, 64, args.repeats)
    print(json.dumps(result, indent=1))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()

"""Speculative decoding against plain decoding, wall clock, same model, prompts and run.

    python benchmarks/speculation.py [--tokens 160] [--repeats 5] [--compile / --no-compile]

Greedy, batch 1, `tiny-code`, with logprobs on (what the speculation notebook asks for).
Each case times the engine without and with a proposer, and `transformers` `generate()`
without and with its own equivalent (`assistant_model=` for the draft,
`prompt_lookup_num_tokens=` for n-grams; it has none for a prediction), and counts the
target's forward passes. Outputs are checked identical before anything is timed.

- edit: a prediction that is the plain output with one line changed in its middle
  (a code edit, as the model sees it: most of the output is known);
- exact: the plain output itself as the prediction;
- draft: `tiny-code-draft` proposing 4 tokens a step;
- ngram: prompt lookup on a prompt whose continuation repeats parts of it.

Writes JSON to benchmarks/results/speculation.json.
"""
from __future__ import annotations

import argparse
import heapq
import inspect
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import toolkit as tk

CODE = inspect.getsource(heapq.nlargest)[:500]   # code to continue: the stdlib's own
REPEATS = ("class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y"
           "\n\n    def __repr__(self):\n        return f'Point({self.x}, {self.y})'\n\n\n"
           "class Size:\n    def __init__(self, width, height):\n        self.width = width\n")


def median_time(fn, repeats: int) -> float:
    fn()                                         # warm-up: allocations, lazy init
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def counted(llm: tk.LLM) -> dict:
    """Count the target's forward passes (every prefill chunk, decode step, verify)."""
    runner, counter = llm.engine.runner, {"n": 0}
    for name in ("prefill", "decode", "extend"):
        method = getattr(runner, name)
        def wrapped(*a, _m=method, **k):
            counter["n"] += 1
            return _m(*a, **k)
        setattr(runner, name, wrapped)
    return counter


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=160)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--out", type=Path, default=None,
                        help="default: results/speculation.json (speculation_eager.json "
                             "with --no-compile)")
    args = parser.parse_args()
    name = "speculation.json" if args.compile else "speculation_eager.json"
    args.out = args.out or Path(__file__).parent / "results" / name
    opts = dict(compile=args.compile)
    plain = tk.load("tiny-code", **opts)
    draft = tk.load("tiny-code", draft_model="tiny-code-draft", **opts)
    ngram = tk.load("tiny-code", ngram_speculation=True, **opts)
    for llm in (plain, draft):
        for runner in (llm.engine.runner, llm.engine.draft):
            if runner is not None and runner.step is not None:
                runner.step.wait()
    counters = {id(llm): counted(llm) for llm in (plain, draft, ngram)}
    kw = dict(max_tokens=args.tokens, temperature=0, ignore_eos=True, logprobs=True)

    def run(llm: tk.LLM, prompt: str, **extra):
        return llm.completions.create(prompt=prompt, **kw, **extra)

    def generate(prompt: str, **extra) -> None:
        ids = torch.tensor([plain.tokenizer(prompt)["input_ids"]])
        with torch.inference_mode():
            plain.model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens,
                                 do_sample=False, pad_token_id=plain.info.eos_token_ids[0],
                                 **extra)

    base = {p: run(plain, p).choices[0].text for p in (CODE, REPEATS)}
    middle = len(base[CODE]) // 2
    edited = base[CODE][:middle] + "\n    x = compute(x)\n" + base[CODE][middle:]
    cases = {
        "edit": (CODE, plain, {"prediction": edited}, None),
        "exact": (CODE, plain, {"prediction": base[CODE]}, None),
        "draft": (CODE, draft, {}, {"assistant_model": draft.draft.model}),
        "ngram": (REPEATS, ngram, {}, {"prompt_lookup_num_tokens": 8}),
    }
    results = []
    for name, (prompt, llm, extra, hf) in cases.items():
        assert run(llm, prompt, **extra).choices[0].text == base[prompt], name
        counter = counters[id(llm)]
        counter["n"] = 0
        run(llm, prompt, **extra)
        spec_forwards = counter["n"]
        counters[id(plain)]["n"] = 0
        run(plain, prompt)
        plain_forwards = counters[id(plain)]["n"]
        t_plain = median_time(lambda: run(plain, prompt), args.repeats)
        t_spec = median_time(lambda: run(llm, prompt, **extra), args.repeats)
        row = {"case": name, "plain_tok_s": round(args.tokens / t_plain, 1),
               "speculative_tok_s": round(args.tokens / t_spec, 1),
               "speedup": round(t_plain / t_spec, 2),
               "target_forwards": spec_forwards, "plain_forwards": plain_forwards,
               "acceptance": run(llm, prompt, perf_metrics_in_response=True, **extra)
               .perf_metrics.get("speculation-acceptance")}
        t_gen = median_time(lambda: generate(prompt), args.repeats)
        row["generate_tok_s"] = round(args.tokens / t_gen, 1)
        if hf is not None:
            t_gen_spec = median_time(lambda: generate(prompt, **hf), args.repeats)
            row["generate_speculative_tok_s"] = round(args.tokens / t_gen_spec, 1)
        print(json.dumps(row))
        results.append(row)
    out = {"machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
           "torch": torch.__version__, "compiled_step": args.compile,
           "new_tokens": args.tokens, "cases": results}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()

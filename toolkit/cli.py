"""`toolkit`: run a completion on a model and show its text and tokens with logprobs."""
from __future__ import annotations

import argparse
from dataclasses import asdict
from typing import Optional, Sequence

from .llm import load
from .models import DEFAULT_MODEL


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="toolkit", description=__doc__)
    parser.add_argument("model", nargs="?", default=DEFAULT_MODEL,
                        help="embedded model name, local folder or hub id")
    parser.add_argument("--prompt",
                        default="def read_lines(path):\n    with open(path) as f:\n        ")
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    parser.add_argument("--info", action="store_true", help="describe the model and stop")
    args = parser.parse_args(argv)
    # One short completion: compiling the decode step would only delay the exit.
    llm = load(args.model, device=args.device, dtype=args.dtype, compile=False)
    print(llm)
    if args.info:
        for key, value in asdict(llm.info).items():
            print(f"  {key:18} {value}")
        return
    resp = llm.completions.create(prompt=args.prompt, max_tokens=args.max_tokens,
                                  temperature=args.temperature, seed=args.seed, logprobs=True,
                                  top_logprobs=3)
    choice = resp.choices[0]
    print(f"\n{args.prompt}\033[1m{choice.text}\033[0m\n")
    print(f"{'pos':>3}  {'token':<16} {'logprob':>8}   top alternatives")
    for pos, entry in enumerate(choice.logprobs.content):
        alts = "  ".join(f"{t.token!r} {t.logprob:.2f}" for t in entry.top_logprobs)
        print(f"{pos:>3}  {entry.token!r:<16} {entry.logprob:>8.3f}   {alts}")
    print(f"\nfinish_reason={choice.finish_reason}  usage={resp.usage.model_dump()}")


if __name__ == "__main__":
    main()

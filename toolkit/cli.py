"""`toolkit`: run a completion on a model and show its text and tokens with logprobs."""
from __future__ import annotations

import argparse
import sys
from dataclasses import asdict
from typing import Any, Optional, Sequence

from .errors import APIError
from .models import DEFAULT_MODEL, ZOO_NAMES
from .schema import validate_request

PROMPT = "def read_lines(path):\n    with open(path) as f:\n        "


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="toolkit", description=__doc__,
        epilog=f"Embedded models: {', '.join(ZOO_NAMES)}.")
    add = parser.add_argument
    add("model", nargs="?", default=DEFAULT_MODEL,
        help="embedded model name, local folder or hub id (org/name); default: %(default)s")
    add("--prompt", default=PROMPT, help="text to complete; default: the start of a "
        "read_lines function")
    add("--max-tokens", type=int, default=32, help="tokens to generate; default: %(default)s")
    add("--temperature", type=float, default=0.0,
        help="0 to 2, 0 is greedy; default: %(default)s")
    add("--seed", type=int, default=0, help="sampling seed; default: %(default)s")
    add("--n", type=int, default=1, help="completions to generate; default: %(default)s")
    add("--top-logprobs", type=int, default=3,
        help="alternatives shown per token, 0 to 5; default: %(default)s")
    add("--stream", action="store_true", help="print the text as it is generated")
    add("--device", default=None, help="cpu, cuda, cuda:1, ...; default: CUDA when present")
    add("--dtype", default=None,
        help="float32, bfloat16 or float16; default: bfloat16 on a GPU, float32 on a CPU")
    add("--info", action="store_true", help="describe the model and stop")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    parser = _parser()
    args = parser.parse_args(argv)
    request = dict(prompt=args.prompt, max_tokens=args.max_tokens, n=args.n,
                   temperature=args.temperature, seed=args.seed, logprobs=True,
                   top_logprobs=args.top_logprobs, stream=args.stream)
    try:
        validate_request(request)          # a bad option fails before the model loads
        _run(args, request)
    except APIError as err:                # a user's mistake: one line, exit code 2
        parser.error(str(err))


def _run(args: argparse.Namespace, request: dict[str, Any]) -> None:
    from .llm import load

    bold, plain = ("\033[1m", "\033[0m") if sys.stdout.isatty() else ("", "")
    # One short completion: compiling the decode step would only delay the exit.
    llm = load(args.model, device=args.device, dtype=args.dtype, compile=False)
    print(llm)
    if args.info:
        for key, value in asdict(llm.info).items():
            print(f"  {key:18} {value}")
        return
    if args.stream:
        print(f"\n{args.prompt}{bold}", end="", flush=True)
        for chunk in llm.completions.create(**request):
            print(chunk.choices[0].text, end="", flush=True)
        print(plain)
        return
    resp = llm.completions.create(**request)
    for choice in resp.choices:
        print(f"\n{args.prompt}{bold}{choice.text}{plain}\n")
        print(f"{'pos':>3}  {'token':<16} {'logprob':>8}   top alternatives")
        for pos, entry in enumerate(choice.logprobs.content):
            alts = "  ".join(f"{t.token!r} {t.logprob:.2f}" for t in entry.top_logprobs)
            print(f"{pos:>3}  {entry.token!r:<16} {entry.logprob:>8.3f}   {alts}")
        print(f"\nchoice {choice.index}: finish_reason={choice.finish_reason}")
    print(f"usage={resp.usage.model_dump()}")


if __name__ == "__main__":
    main()

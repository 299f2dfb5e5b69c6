"""`toolkit`: run a completion on a model and show its text and tokens with logprobs.
`toolkit serve`: serve a model's completions API over HTTP."""
from __future__ import annotations

import argparse
import os
import sys
import threading
from dataclasses import asdict, fields
from typing import Any, Optional, Sequence

from .errors import APIError
from .models import DEFAULT_MODEL, ZOO_NAMES
from .schema import validate_request

PROMPT = "def read_lines(path):\n    with open(path) as f:"


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
    add("--frequency-penalty", type=float, default=None,
        help="-2 to 2, above 0 makes tokens less likely each time they recur; default: what "
        "the model's card recommends (0.7 for the zoo's models, whose greedy decoding "
        "loops), else 0")
    add("--repetition-penalty", type=float, default=None,
        help="above 1 makes tokens of the prompt or output less likely; default: what the "
        "model's card recommends, else 1")
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
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        return serve(argv[1:])
    parser = _parser()
    args = parser.parse_args(argv)
    request = dict(prompt=args.prompt, max_tokens=args.max_tokens, n=args.n,
                   temperature=args.temperature, seed=args.seed, logprobs=True,
                   top_logprobs=args.top_logprobs, stream=args.stream)
    for knob in ("frequency_penalty", "repetition_penalty"):
        if getattr(args, knob) is not None:
            request[knob] = getattr(args, knob)
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
    recommended = {k: v for k, v in llm.info.sampling.items() if k not in request}
    if recommended and not args.info:        # the card's sampling, unless overridden
        request.update(recommended)
        print("sampling as the model card recommends: " + ", ".join(
            f"{k}={v}" for k, v in recommended.items()))
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



def _serve_parser() -> argparse.ArgumentParser:
    from .serve import Limits

    parser = argparse.ArgumentParser(
        prog="toolkit serve", description="Serve a model's /v1/completions over HTTP: "
        "POST /v1/completions (the in-process schema; streams as server-sent events) and "
        "GET /v1/models, for the openai and fireworks-ai SDKs (base_url "
        "http://HOST:PORT/v1), curl and toolkit.remote.",
        epilog=f"Embedded models: {', '.join(ZOO_NAMES)}.")
    add = parser.add_argument
    add("model", nargs="?", default=DEFAULT_MODEL,
        help="embedded model name, local folder or hub id (org/name); default: %(default)s")
    add("--host", default="127.0.0.1", help="address to listen on; default: %(default)s "
        "(loopback: this machine only; any other needs --api-key-env)")
    add("--port", type=int, default=8000, help="default: %(default)s")
    add("--api-key-env", metavar="VAR", help="environment variable holding the API key "
        "clients must send as 'Authorization: Bearer <key>'")
    add("--alias", action="append", default=[], metavar="NAME",
        help="another name requests may give as model (repeatable)")
    add("--draft-model", help="a smaller model with the same tokenizer, for speculation")
    add("--device", default=None, help="cpu, cuda, cuda:1, ...; default: CUDA when present")
    add("--dtype", default=None,
        help="float32, bfloat16 or float16; default: bfloat16 on a GPU, float32 on a CPU")
    for f in fields(Limits):
        add(f"--{f.name.replace('_', '-')}", type=int, default=f.default,
            help="default: %(default)s")
    add("--log-level", default="info", help="uvicorn's; default: %(default)s")
    return parser


def serve(argv: Sequence[str]) -> None:
    """`toolkit serve`: check the options, load the model, serve until Ctrl-C."""
    from .serve import Limits, app, check_host

    parser = _serve_parser()
    args = parser.parse_args(argv)
    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env: the environment variable {args.api_key_env} is "
                         f"not set")
    try:
        check_host(args.host, api_key)       # before the model loads
    except APIError as err:
        parser.error(str(err))
    import uvicorn

    from .llm import load

    # Loaded on a thread of its own, so that this (main) thread never starts torch's
    # OpenMP team: the engine's driver thread then decodes at full speed on a CPU.
    loaded: list[Any] = []

    def load_model() -> None:
        try:
            loaded.append(load(args.model, device=args.device, dtype=args.dtype,
                               draft_model=args.draft_model, aliases=args.alias,
                               progress=False))
        except BaseException as err:         # raised again on this thread
            loaded.append(err)

    loader = threading.Thread(target=load_model)
    loader.start()
    loader.join()
    llm = loaded[0]
    if isinstance(llm, APIError):
        parser.error(str(llm))
    if isinstance(llm, BaseException):
        raise llm
    print(f"{llm}\nserving {', '.join([llm.name, *args.alias])} at "
          f"http://{args.host}:{args.port}/v1", flush=True)
    limits = Limits(**{f.name: getattr(args, f.name) for f in fields(Limits)})
    uvicorn.run(app(llm, api_key=api_key, limits=limits), host=args.host, port=args.port,
                log_level=args.log_level)


if __name__ == "__main__":
    main()

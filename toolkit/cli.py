"""`toolkit` console script: load a model and show what the toolkit knows about it."""
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
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    args = parser.parse_args(argv)
    llm = load(args.model, device=args.device, dtype=args.dtype)
    print(llm)
    for key, value in asdict(llm.info).items():
        print(f"  {key:18} {value}")


if __name__ == "__main__":
    main()

"""Structured output: the tokens each row may take next, from a grammar engine.

`response_format` is compiled once per request (`Grammars.compile`, where a bad schema or
grammar becomes an `InvalidRequestError`), and each row of the job gets its own matcher
(`Constraint`), which the decode loop asks for a mask before each token and tells each
token taken. The mask is applied in the sampler after `logit_bias` (DESIGN §3), so raw
logprobs stay unmasked and sampling logprobs are those of the masked distribution.

Why llguidance, not xgrammar (both tried on the zoo tokenizer): both compile our schemas
and tokenizer in milliseconds and agree on what they accept; llguidance is one 4 MB wheel
with no dependencies, where xgrammar brings triton and apache-tvm-ffi (hundreds of MB in
every install, GPU or not); llguidance reads GBNF, the format of the API's `grammar`,
through its own converter, and computes each mask lazily for the current state only.
"""
from __future__ import annotations

import json
from typing import Any, Optional

import torch

from ..errors import InvalidRequestError
from .transfer import to_device

_ANY_OBJECT = '{"type": "object"}'
# JSON as `json.dumps` writes it: no free whitespace, which a small model would otherwise
# fill with runs of spaces and newlines until `max_tokens` (the hosted API's reference
# warns of that). A schema's "x-guidance" key overrides it (llguidance's JSON options).
JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class Grammars:
    """Response formats compiled for one tokenizer. The grammar engine's view of the
    tokenizer takes ~0.5 s to build: it is built on the first request that needs it."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self._tokenizer: Any = None
        self._executor: Any = None

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self.hf_tokenizer)
        return self._tokenizer

    @property
    def executor(self) -> Any:
        """llguidance's thread pool, which computes several rows' masks at once."""
        if self._executor is None:
            import llguidance

            self._executor = llguidance.LLExecutor()
        return self._executor

    def compile(self, response_format: Any) -> Optional[str]:
        """The grammar (llguidance's serialised form) that a request's `response_format`
        asks for, or None for plain text."""
        import llguidance

        kind = None if response_format is None else response_format.type
        if kind in (None, "text"):
            return None
        try:
            if kind == "grammar":
                grammar = llguidance.grammar_from("gbnf", response_format.grammar)
            else:
                grammar = llguidance.LLMatcher.grammar_from_json_schema(
                    _schema_text(response_format), defaults=JSON_STYLE)
        except (ValueError, TypeError) as err:
            raise InvalidRequestError(f"response_format: {err}", "response_format") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequestError(f"response_format: the {kind} does not compile: "
                                      f"{error}", "response_format")
        return grammar

    def constraint(self, grammar: str, rows: int, device: torch.device) -> "Constraint":
        return Constraint(self, grammar, rows, device)


def _schema_text(response_format: Any) -> str:
    """The JSON schema of a `json_object` or `json_schema` format, as JSON text. The schema
    may come under `json_schema` or `schema`, as an object or a string, and (OpenAI's
    form) wrapped as {"name": ..., "schema": {...}, "strict": ...}."""
    if response_format.type == "json_object":
        return _ANY_OBJECT
    schema = response_format.json_schema
    if schema is None:
        schema = response_format.schema_
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as err:
            raise InvalidRequestError(f"response_format: the JSON schema is not valid JSON "
                                      f"({err})", "response_format") from None
    if not isinstance(schema, dict):
        raise InvalidRequestError("response_format: a JSON schema must be an object",
                                  "response_format")
    if isinstance(schema.get("schema"), dict) and not {"type", "properties"} & set(schema):
        schema = schema["schema"]
    return json.dumps(schema)


class Constraint:
    """One matcher per row of a job: the tokens each row may take next, as a mask."""

    def __init__(self, grammars: Grammars, grammar: str, rows: int,
                 device: torch.device) -> None:
        import llguidance

        self.tokenizer = grammars.tokenizer
        self.vocab_size = grammars.vocab_size
        self.executor = grammars.executor if rows > 1 else None
        self.device = device
        first = llguidance.LLMatcher(self.tokenizer, grammar)
        self.matchers = [first] + [first.deep_copy() for _ in range(rows - 1)]

    def allowed(self, rows: list[int]) -> torch.Tensor:
        """[all rows, vocab] booleans: for each of `rows` the tokens its grammar allows
        next; every token for the others. A matcher in an error state (it should never
        get there) allows only EOS, so the row ends instead of sampling from nothing."""
        words = (self.tokenizer.vocab_size + 31) // 32
        bits = torch.full((len(self.matchers), words), -1, dtype=torch.int32)
        # (as llguidance.torch does, which compiles a kernel on import)
        if len(rows) > 1:
            self.executor.unsafe_compute_mask_ptr([(self.matchers[r], r) for r in rows],
                                                  bits.data_ptr(), words * 4, len(bits))
        elif rows:
            r = rows[0]
            self.matchers[r].unsafe_compute_mask_ptr(bits[r].data_ptr(), words * 4)
        eos = self.tokenizer.eos_token
        for r in rows:
            if not bits[r].any():                 # int32: bit 31 is the sign bit
                bits[r, eos // 32] = (1 << eos % 32) - (1 << 32 if eos % 32 == 31 else 0)
        shifts = torch.arange(32, dtype=torch.int32, device=self.device)
        mask = (to_device(bits, self.device)[:, :, None] >> shifts) & 1
        mask = mask.view(len(self.matchers), -1).bool()
        if mask.shape[1] >= self.vocab_size:
            return mask[:, :self.vocab_size]
        pad = mask.new_zeros(len(self.matchers), self.vocab_size - mask.shape[1])
        return torch.cat([mask, pad], 1)        # model rows past the tokenizer: never

    def advance(self, row: int, token: int) -> bool:
        """Take a row's token; True once its grammar is complete (nothing but EOS may
        follow)."""
        matcher = self.matchers[row]
        matcher.consume_token(token)
        return matcher.is_stopped()

"""`llm.completions.create`: request -> engine job -> response, or a stream of chunks.

Everything about a request is checked before the engine starts (nothing half-runs): the
fields by the schema, then what depends on the model (token ids in the vocabulary, the
context window, features the model has). A stream is validated eagerly too: `create`
raises at once, and only then hands back the iterator.
"""
from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from typing import TYPE_CHECKING, Any, Iterator, Union
from typing import Sequence as SequenceOf

from .engine.sampler import SamplingParams, row_seed
from .engine.sequence import Job, Sequence
from .engine.text import StopStrings
from .errors import InvalidRequestError
from .responses import (ChoiceDetails, TokenText, choice_logprobs, content_entries, details,
                        perf_metrics, raw_output, usage, wants_content)
from .schema import Choice, Completion, CompletionChunk, CompletionRequest, validate_request

if TYPE_CHECKING:
    from .llm import LLM

# Fields with issues of their own; until they land, a clear error rather than a silent no-op.
_NOT_YET = {
    "speculation": "speculative decoding (speculation / prediction)",
    "reasoning_effort": "reasoning_effort",
    "images": "images (vision-language input)",
}


class Completions:
    """The `/v1/completions` resource of a loaded model."""

    def __init__(self, llm: "LLM") -> None:
        self._llm = llm

    def create(self, **fields: Any) -> Union[Completion, Iterator[CompletionChunk]]:
        """Run a completion request; every field of the hosted API is accepted."""
        run = self._prepare(fields, time.perf_counter())
        return run.stream() if run.req.stream else run.complete()

    def create_batch(self, requests: SequenceOf[dict[str, Any]]) -> list[Completion]:
        """Run several whole (non-streaming) requests. Those that differ only in sampling
        knobs and seed share one decode loop, each row keeping its own knobs and seed
        stream, so the results equal one `create` per request at a fraction of the cost:
        a sweep over knobs costs about one request per prompt setting."""
        started = time.perf_counter()
        runs = [self._prepare(fields, started) for fields in requests]
        if any(run.req.stream for run in runs):
            raise InvalidRequestError("create_batch returns whole responses: stream must be "
                                      "false", "stream")
        groups: dict[tuple, list[_Run]] = {}
        for run in runs:
            groups.setdefault(run.job.batch_key, []).append(run)
        for group in groups.values():
            _run_together(self._llm, group)
        return [run.response() for run in runs]

    def _prepare(self, fields: dict[str, Any], started: float) -> "_Run":
        """Validate a request against the schema and the model, and plan its engine job."""
        req = validate_request(fields)
        model = self._llm.resolve_model(req.model)
        self._check_features(req)
        job = self._plan(req)
        return _Run(self._llm, req, job, model, started, time.perf_counter())

    def _check_features(self, req: CompletionRequest) -> None:
        info = self._llm.info
        for name, what in _NOT_YET.items():
            if getattr(req, name) not in (None, [], False):
                raise InvalidRequestError(f"{what} is not supported by this engine yet", name)
        if req.response_format is not None and req.response_format.type != "text":
            raise InvalidRequestError("response_format other than 'text' is not supported by "
                                      "this engine yet", "response_format")
        if req.include_routing_matrix and not info.is_moe:
            raise InvalidRequestError(f"include_routing_matrix needs a mixture-of-experts "
                                      f"model; {info.name} is dense", "include_routing_matrix")
        for flag in ("include_last_activation", "include_routing_matrix"):
            if getattr(req, flag) and req.logprobs_format == "legacy":
                raise InvalidRequestError(f"{flag} rides on the new logprobs format: use "
                                          f"logprobs=true, not an integer", flag)
        for layer in req.activation_layers or []:
            if not -info.num_layers <= layer < info.num_layers:
                raise InvalidRequestError(f"activation_layers: layer {layer} does not exist; "
                                          f"{info.name} has {info.num_layers}",
                                          "activation_layers")
        for token in req.logit_bias or {}:
            if int(token) >= info.vocab_size:
                raise InvalidRequestError(f"logit_bias token id {token} is outside the "
                                          f"vocabulary of {info.vocab_size}", "logit_bias")

    def _tokenize(self, req: CompletionRequest) -> list[list[int]]:
        vocab = self._llm.info.vocab_size
        prompts = []
        for p in req.prompts:
            ids = self._llm.tokenizer(p)["input_ids"] if isinstance(p, str) else list(p)
            if not ids:
                raise InvalidRequestError("prompt is empty (and the tokenizer adds no BOS "
                                          "token)", "prompt")
            if max(ids) >= vocab:
                raise InvalidRequestError(f"prompt token id {max(ids)} is outside the "
                                          f"vocabulary of {vocab}", "prompt")
            prompts.append(ids)
        return prompts

    def _plan(self, req: CompletionRequest) -> Job:
        info = self._llm.info
        prompts = self._tokenize(req)
        window = info.context_length
        max_new = []
        for ids in prompts:
            if len(ids) > window:
                raise InvalidRequestError(f"prompt is {len(ids)} tokens, longer than the "
                                          f"context window of {window}", "prompt")
            if len(ids) + req.max_new_tokens > window and \
                    req.context_length_exceeded_behavior == "error":
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) plus max_tokens ({req.max_new_tokens}) "
                    f"exceeds the context window of {window}", "max_tokens")
            max_new.append(min(req.max_new_tokens, window - len(ids)))
        echo = [len(ids) if req.echo else min(req.echo_last or 0, len(ids)) for ids in prompts]
        params = SamplingParams(
            temperature=_or(req.temperature, 1.0), top_k=_or(req.top_k, 0),
            top_p=_or(req.top_p, 1.0), min_p=_or(req.min_p, 0.0),
            typical_p=_or(req.typical_p, 1.0),
            frequency_penalty=_or(req.frequency_penalty, 0.0),
            presence_penalty=_or(req.presence_penalty, 0.0),
            repetition_penalty=_or(req.repetition_penalty, 1.0),
            mirostat_target=req.mirostat_target, mirostat_lr=_or(req.mirostat_lr, 0.1),
            logit_bias={int(k): v for k, v in (req.logit_bias or {}).items()})
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        rows = [(i, j) for i in range(len(prompts)) for j in range(req.n)]
        return Job(prompts=prompts, n=req.n, params=[params] * len(rows),
                   seeds=[row_seed(seed, i, j) for i, j in rows], max_new=max_new, echo=echo,
                   top_n=req.num_top_logprobs,
                   capture_hidden=req.include_last_activation,
                   capture_routing=req.include_routing_matrix,
                   activation_layers=tuple(dict.fromkeys(
                       layer % info.num_layers for layer in req.activation_layers or [])),
                   stops=req.stop_sequences, eos_ids=frozenset(info.eos_token_ids),
                   ignore_eos=req.ignore_eos, cache_key=req.prompt_cache_isolation_key,
                   cache_max_len=req.prompt_cache_max_len)


def _or(value: Any, default: Any) -> Any:
    return default if value is None else value


def _run_together(llm: "LLM", runs: list["_Run"]) -> None:
    """Run requests with the same `Job.batch_key` as one engine job, then hand each its
    rows back, renumbered as if it had run alone."""
    jobs = [run.job for run in runs]
    merged = dataclasses.replace(
        jobs[0], prompts=[p for j in jobs for p in j.prompts],
        params=[p for j in jobs for p in j.params], seeds=[s for j in jobs for s in j.seeds],
        max_new=[m for j in jobs for m in j.max_new], echo=[e for j in jobs for e in j.echo],
        cached_tokens=[], echoes=[], timings={})
    status, steps, seqs = "cancelled", llm.engine.run(merged), []
    try:
        for changed in steps:
            seqs = seqs or changed
        status = "completed"
    finally:
        steps.close()
        prompts, rows = len(jobs[0].prompts), jobs[0].rows
        for r, run in enumerate(runs):
            run.job.timings = dict(merged.timings)
            run.job.echoes = merged.echoes[r * prompts:(r + 1) * prompts]
            run.job.cached_tokens = merged.cached_tokens[r * prompts:(r + 1) * prompts]
            run.seqs = seqs[r * rows:(r + 1) * rows]
            for s in run.seqs:
                s.index -= r * rows
                s.prompt_index -= r * prompts
            run._log(status)


class _Run:
    """One request on the engine, turned into a response or into chunks."""

    def __init__(self, llm: "LLM", req: CompletionRequest, job: Job, model: str,
                 started: float, tokenized: float) -> None:
        self.llm, self.req, self.job, self.model = llm, req, job, model
        self.started, self.tokenized = started, tokenized
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.names = TokenText(llm.engine.pieces)
        self.concurrent = llm.engine.waiting + 1
        self.stops = StopStrings(req.stop_sequences)
        self.seqs: list[Sequence] = []
        self.opened: set[int] = set()       # rows that have had their first chunk

    def complete(self) -> Completion:
        _run_together(self.llm, [self])
        return self.response()

    def response(self) -> Completion:
        resp = Completion(id=self.id, created=self.created, model=self.model,
                          choices=[self._choice(s) for s in self.seqs],
                          usage=usage(self.job, self.seqs), perf_metrics=self._perf())
        resp._details = {s.index: self._details(s, 0, len(s.out), True) for s in self.seqs}
        return resp

    def stream(self) -> Iterator[CompletionChunk]:
        status, steps = "cancelled", self.llm.engine.run(self.job)
        try:
            for changed in steps:
                if not self.seqs:   # after the prefill: only echoes and finished rows
                    self.seqs = changed
                    changed = [s for s in changed if s.finished or self.job.echo[s.prompt_index]]
                for s in changed:
                    first, start = s.index not in self.opened, s.streamed_tokens
                    chunk = self._chunk([self._choice_delta(s)])
                    chunk._details = {s.index: self._details(s, start, len(s.out), first)}
                    yield chunk
            status = "completed"
            yield self._chunk([], usage=usage(self.job, self.seqs), perf=self._perf())
        finally:
            steps.close()
            self._log(status)

    # ---------------------------------------------------------------- choices and chunks

    def _echo_text(self, s: Sequence) -> str:
        return self.job.echoes[s.prompt_index].text.text

    def _entries(self, s: Sequence, start: int, end: int, with_echo: bool) -> list:
        echo = self.job.echoes[s.prompt_index]
        shift = len(echo.text.text)
        entries = content_entries(echo, 0, len(echo), 0, self.names, False) if with_echo \
            else []
        return entries + content_entries(s.out, start, end, shift, self.names, True)

    def _details(self, s: Sequence, start: int, end: int, with_echo: bool) -> ChoiceDetails:
        echo, prompt = self.job.echoes[s.prompt_index], self.job.prompts[s.prompt_index]
        logs = ([(echo, 0, len(echo))] if with_echo else []) + [(s.out, start, end)]
        first = len(prompt) - len(echo) if with_echo else len(prompt) + start
        return details(s.prompt_index, len(prompt), logs, first, self.job.activation_layers,
                       self.llm.info.num_layers)

    def _choice(self, s: Sequence) -> Choice:
        req, echo = self.req, self.job.echoes[s.prompt_index]
        entries = self._entries(s, 0, len(s.out), True) if wants_content(req) else None
        return Choice(
            index=s.index, text=self._echo_text(s) + s.text, finish_reason=s.finish_reason,
            logprobs=None if entries is None else choice_logprobs(req, entries),
            raw_output=raw_output(req, self.job, s, echo, entries) if req.raw_output else None,
            prompt_token_ids=self.job.prompts[s.prompt_index] if req.return_token_ids
            else None,
            token_ids=s.out.ids if req.return_token_ids else None)

    def _choice_delta(self, s: Sequence) -> Choice:
        """What is new for a row since its last chunk: text that can no longer turn into a
        stop string, the tokens generated since, and the finish reason once finished."""
        req, first = self.req, s.index not in self.opened
        self.opened.add(s.index)
        text = s.text if s.finished else s.out.text.text
        upto = len(text) if s.finished else len(text) - self.stops.holdback(text)
        delta = (self._echo_text(s) if first else "") + text[s.streamed_text:upto]
        start, end = s.streamed_tokens, len(s.out)
        s.streamed_text, s.streamed_tokens = max(upto, s.streamed_text), end
        entries = self._entries(s, start, end, first) if wants_content(req) else None
        return Choice(index=s.index, text=delta, finish_reason=s.finish_reason,
                      logprobs=None if entries is None else choice_logprobs(req, entries),
                      prompt_token_ids=self.job.prompts[s.prompt_index]
                      if req.return_token_ids and first else None,
                      token_ids=s.out.ids[start:end] if req.return_token_ids else None)

    def _chunk(self, choices: list[Choice], usage: Any = None, perf: Any = None
               ) -> CompletionChunk:
        return CompletionChunk(id=self.id, created=self.created, model=self.model,
                               choices=choices, usage=usage, perf_metrics=perf)

    def _perf(self) -> Any:
        if not self.req.perf_metrics_in_response:
            return None
        return perf_metrics(self.job, self.model, self.started, self.tokenized,
                            self.concurrent, self.seqs)

    def _log(self, status: str) -> None:
        req, job = self.req, self.job
        timings = perf_metrics(job, self.model, self.started, self.tokenized,
                               self.concurrent, self.seqs) if "prefill_end" in job.timings \
            else {}
        self.llm.request_log.record({
            "id": self.id, "created": self.created, "model": self.model, "status": status,
            "user": req.user, "metadata": req.metadata,
            "params": req.model_dump(exclude_none=True, exclude_defaults=True),
            "usage": usage(job, self.seqs).model_dump() if self.seqs else None,
            "finish_reasons": [s.finish_reason for s in self.seqs],
            "timings": {k: v for k, v in timings.items() if isinstance(v, (int, float))},
        })

"""`llm.completions.create`: request -> engine job -> response, or a stream of chunks.

Everything about a request is checked before the engine starts (nothing half-runs): the
fields by the schema, then what depends on the model (token ids in the vocabulary, the
context window, features the model has). A stream is validated eagerly too: `create`
raises at once, and only then hands back the iterator, whose job starts when it is first
iterated.

The engine answers with `Update`s; this layer keeps each choice's tokens and what of it
has been streamed, and turns them into responses and chunks.
"""
from __future__ import annotations

import dataclasses
import secrets
import time
import uuid
from concurrent.futures import CancelledError
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterator, Literal, Optional, Union
from typing import Sequence as SequenceOf

from tqdm.auto import tqdm

from . import vision
from .engine import reasoning
from .engine.collector import collector_held
from .engine.outputs import Capture, RowUpdate, TokenLog, Update
from .engine.sampler import SamplingParams, row_seed
from .engine.sequence import Job
from .engine.text import StopStrings
from .errors import InvalidRequestError, brief
from .frames import ChoiceDetails
from .responses import (LocalChunk, LocalCompletion, TokenText, content_entries, details,
                        legacy_logprobs, perf_metrics, raw_output, usage, wants_content)
from .schema import Choice, CompletionRequest, NewLogprobs, field_docs, validate_request

if TYPE_CHECKING:
    from .llm import LLM

class _Required:
    """The default of `create`'s `prompt`: leaving it out is the API's 400, not a
    TypeError, so that `create(messages=...)` can be told what this API takes instead."""

    def __repr__(self) -> str:
        return "<required>"


REQUIRED: Any = _Required()
_PROGRESS_AFTER_S = 2.0      # a request that finishes sooner shows no bar

class Completions:
    """The `/v1/completions` resource of a loaded model."""

    def __init__(self, llm: "LLM") -> None:
        self._llm = llm
        self.names = TokenText(llm.engine.pieces)    # shared by every response

    def create(self, /, *, prompt: Union[str, list[str], list[int], list[list[int]]]
               = REQUIRED, model: Optional[str] = None, user: Optional[str] = None,
               prompt_cache_max_len: Optional[int] = None,
               prompt_cache_isolation_key: Optional[str] = None,
               raw_output: Optional[bool] = False,
               perf_metrics_in_response: Optional[bool] = False,
               stream: Optional[bool] = False, n: int = 1,
               stop: Union[str, list[str], None] = None, max_tokens: Optional[int] = None,
               max_completion_tokens: Optional[int] = None,
               temperature: Optional[float] = None, top_k: Optional[int] = None,
               top_p: Optional[float] = None, min_p: Optional[float] = None,
               typical_p: Optional[float] = None, frequency_penalty: Optional[float] = None,
               presence_penalty: Optional[float] = None,
               repetition_penalty: Optional[float] = None,
               mirostat_target: Optional[float] = None, mirostat_lr: Optional[float] = None,
               seed: Optional[int] = None, logprobs: Union[bool, int, None] = None,
               top_logprobs: Optional[int] = None, echo: Optional[bool] = False,
               echo_last: Optional[int] = None, ignore_eos: bool = False,
               context_length_exceeded_behavior: Literal["error", "truncate"] = "truncate",
               response_format: Optional[dict[str, Any]] = None,
               logit_bias: Optional[dict[Union[str, int], float]] = None,
               speculation: Union[str, list[int], None] = None,
               prediction: Union[dict[str, Any], str, None] = None,
               metadata: Optional[dict[str, str]] = None,
               reasoning_effort: Union[str, bool, int, None] = None,
               return_token_ids: Optional[bool] = False, images: Optional[list[str]] = None,
               include_last_activation: bool = False, include_routing_matrix: bool = False,
               activation_layers: Optional[list[int]] = None,
               logprobs_for_tokens: Optional[list[Union[int, str]]] = None, **unknown: Any
               ) -> Union[LocalCompletion, Iterator[LocalChunk]]:
        # (the docstring is written from the schema's field descriptions: see below)
        fields = {name: value for name, value in locals().items()
                  if name not in ("self", "unknown") and value is not REQUIRED}
        run = self._prepare({**fields, **unknown}, time.perf_counter())
        return run.stream() if run.req.stream else run.complete()

    def create_batch(self, requests: SequenceOf[dict[str, Any]],
                     progress: Optional[bool] = None) -> list[LocalCompletion]:
        """Run several whole (non-streaming) requests, each a dict of `create`'s fields.
        Those that differ only in sampling
        knobs and seed share one decode loop, each row keeping its own knobs and seed
        stream, so the results equal one `create` per request at a fraction of the cost:
        a sweep over knobs costs about one request per prompt setting. (The same tokens
        barring a near-tie; logprobs equal to float rounding, ~1e-6: a merged batch
        multiplies matrices of another shape, which may sum in another order.) `progress`
        (default: `llm.progress`) shows a bar when the batch runs longer than 2 s."""
        started = time.perf_counter()
        if isinstance(requests, (str, bytes, dict)) or not hasattr(requests, "__iter__"):
            raise InvalidRequestError(f"create_batch takes a list of requests, got "
                                      f"{brief(requests)}", "request")
        runs = [self._prepare(fields, started) for fields in requests]
        if any(run.req.stream for run in runs):
            raise InvalidRequestError("create_batch returns whole responses: stream must be "
                                      "false", "stream")
        groups: dict[tuple, list[_Run]] = {}
        for run in runs:
            groups.setdefault(run.job.batch_key, []).append(run)
        with collector_held():
            for group in groups.values():
                _run_together(self._llm, group, progress)
            return [run.response() for run in runs]

    def _prepare(self, fields: Any, started: float) -> "_Run":
        """Validate a request against the schema and the model, and plan its engine job."""
        req = validate_request(fields)
        model = self._llm.resolve_model(req.model)
        self._check_features(req)
        job = self._plan(req)
        return _Run(self._llm, req, job, model, started, time.perf_counter())

    def _check_features(self, req: CompletionRequest) -> None:
        info = self._llm.info
        if req.images and info.image_token is None:
            raise InvalidRequestError(f"images need a vision-language model; {info.name} "
                                      f"takes text only", "images")
        if req.reasoning_effort is not None and info.think_token_ids is None:
            raise InvalidRequestError(f"reasoning_effort needs a model with think tokens; "
                                      f"{info.name} declares none", "reasoning_effort")
        if req.include_routing_matrix and not info.is_moe:
            raise InvalidRequestError(f"include_routing_matrix needs a mixture-of-experts "
                                      f"model; {info.name} is dense", "include_routing_matrix")
        for flag in ("include_last_activation", "include_routing_matrix",
                     "logprobs_for_tokens"):
            if getattr(req, flag) and req.logprobs_format == "legacy":
                raise InvalidRequestError(f"{flag} rides on the new logprobs format: use "
                                          f"logprobs=true, not an integer", flag)
        for layer in req.activation_layers or []:
            if not -info.num_layers <= layer < info.num_layers:
                raise InvalidRequestError(f"activation_layers: layer {brief(layer)} does not "
                                          f"exist; {info.name} has {info.num_layers}",
                                          "activation_layers")
        self._check_vocab([int(token) for token in req.logit_bias or {}], "logit_bias")

    def _check_vocab(self, ids: SequenceOf[int], param: str) -> None:
        """Token ids given as `param` must be in the model's vocabulary."""
        vocab = self._llm.info.vocab_size
        if ids and max(ids) >= vocab:
            raise InvalidRequestError(f"{param} token id {brief(max(ids))} is outside the "
                                      f"vocabulary of {vocab}", param)

    def _tokenize(self, req: CompletionRequest
                  ) -> tuple[list[tuple[int, ...]], Optional[tuple[dict[str, Any], ...]]]:
        """Each prompt's token ids, and with images, each prompt's image inputs."""
        if req.images:
            encoded = vision.prepare(self._llm.target.processor, self._llm.info.image_token,
                                     req.prompts, req.images)
            tokenized, inputs = [ids for ids, _ in encoded], tuple(x for _, x in encoded)
        else:
            # verbose=False: a prompt over the context window gets our error (below), not
            # the tokenizer's warning first
            tokenized = [self._llm.tokenizer(p, verbose=False)["input_ids"]
                         if isinstance(p, str) else list(p) for p in req.prompts]
            inputs = None
        prompts = []
        for ids in tokenized:
            if not ids:
                raise InvalidRequestError("prompt is empty (and the tokenizer adds no BOS "
                                          "token)", "prompt")
            self._check_vocab(ids, "prompt")
            prompts.append(tuple(ids))
        return prompts, inputs

    def _plan(self, req: CompletionRequest) -> Job:
        info = self._llm.info
        prompts, images = self._tokenize(req)
        window = info.context_length
        max_new = []
        for ids in prompts:
            if len(ids) > window:
                raise InvalidRequestError(f"prompt is {len(ids)} tokens, longer than the "
                                          f"context window of {window}", "prompt")
            if len(ids) + req.max_new_tokens > window and \
                    req.context_length_exceeded_behavior == "error":
                raise InvalidRequestError(
                    f"prompt ({len(ids)} tokens) plus max_tokens ({brief(req.max_new_tokens)})"
                    f" exceeds the context window of {window}", "max_tokens")
            max_new.append(min(req.max_new_tokens, window - len(ids)))
        speculation = self._speculation(req, window)
        echo = [len(ids) if req.echo else min(req.echo_last or 0, len(ids)) for ids in prompts]
        knobs = {**vars(req), "logit_bias": {int(k): v for k, v in
                                             (req.logit_bias or {}).items()}}
        params = SamplingParams.from_fields(knobs)
        seed = req.seed if req.seed is not None else secrets.randbits(63)
        rows = [(i, j) for i in range(len(prompts)) for j in range(req.n)]
        layers = tuple(dict.fromkeys(layer % info.num_layers
                                     for layer in req.activation_layers or []))
        return Job(prompts=tuple(prompts), n=req.n, params=(params,) * len(rows),
                   seeds=tuple(row_seed(seed, i, j) for i, j in rows),
                   max_new=tuple(max_new), echo=tuple(echo),
                   capture=Capture(scores=wants_content(req), top_n=req.num_top_logprobs,
                                   hidden=req.include_last_activation,
                                   routing=req.include_routing_matrix, layers=layers,
                                   tracked=self._tracked(req)),
                   stops=tuple(req.stop_sequences), eos_ids=frozenset(info.eos_token_ids),
                   ignore_eos=req.ignore_eos, cache_key=req.prompt_cache_isolation_key,
                   cache_max_len=req.prompt_cache_max_len, speculation=speculation,
                   grammar=self._llm.engine.grammars.compile(req.response_format),
                   think_budget=reasoning.budget(req.reasoning_effort, info.reasoning_budgets),
                   images=images)

    def _tracked(self, req: CompletionRequest) -> tuple[int, ...]:
        """`logprobs_for_tokens` as token ids: a string must be exactly one token."""
        ids = []
        for token in req.logprobs_for_tokens or []:
            if isinstance(token, str):
                found = self._llm.tokenizer(token, add_special_tokens=False,
                                            verbose=False)["input_ids"]
                if len(found) != 1:
                    raise InvalidRequestError(
                        f"logprobs_for_tokens: {brief(token)} is {len(found)} tokens, not "
                        f"one; pass the token ids you mean", "logprobs_for_tokens")
                token = found[0]
            ids.append(token)
        self._check_vocab(ids, "logprobs_for_tokens")
        return tuple(ids)

    def _speculation(self, req: CompletionRequest, window: int) -> Optional[tuple[int, ...]]:
        """The predicted output as token ids (text is tokenized without special tokens:
        it continues the prompt)."""
        guess = req.speculation
        if guess is None:
            return None
        ids = self._llm.tokenizer(guess, add_special_tokens=False, verbose=False)[
            "input_ids"] if isinstance(guess, str) else list(guess)
        self._check_vocab(ids, "speculation")
        if len(ids) > window:
            raise InvalidRequestError(f"the prediction is {len(ids)} tokens, longer than the "
                                      f"context window of {window}", "speculation")
        return tuple(ids)


Completions.create.__doc__ = """Run a completion request: the hosted `/v1/completions` fields,
by name, with their defaults and ranges (and the toolkit's extensions).

Returns a `LocalCompletion` (its `model_dump(exclude_none=True)` is the hosted API's JSON;
`resp.tokens()` and the other frames are methods), or with `stream=True` an iterator of
`LocalChunk`s. A bad value raises `toolkit.errors.InvalidRequestError` naming the field.

""" + field_docs(first="prompt")


def _run_together(llm: "LLM", runs: list["_Run"], progress: Optional[bool] = None) -> None:
    """Run requests with the same `Job.batch_key` as one engine job; each takes its own
    rows of every update, renumbered as if it had run alone. A bar (tokens, tokens/s)
    appears if it runs longer than 2 s and `progress` (default `llm.progress`) allows."""
    jobs = [run.job for run in runs]
    merged = dataclasses.replace(
        jobs[0], prompts=tuple(p for j in jobs for p in j.prompts),
        params=tuple(p for j in jobs for p in j.params),
        seeds=tuple(s for j in jobs for s in j.seeds),
        max_new=tuple(m for j in jobs for m in j.max_new),
        echo=tuple(e for j in jobs for e in j.echo))
    handle = llm.engine.submit(merged)
    status = "cancelled"
    bar = _Progress(sum(merged.max_new) * merged.n, runs[0].model.rsplit("/", 1)[-1],
                    llm.progress if progress is None else progress)
    try:
        for update in handle:
            for k, run in enumerate(runs):
                run.apply(update, k)
            bar.update(sum(len(row.tokens) for row in update.rows))
            if update.done:
                status = "completed"
    except CancelledError:
        raise                           # (a `CancelScope` dropped it: "cancelled")
    except Exception:
        status = "error"
        raise
    finally:
        bar.close()
        handle.close()
        for run in runs:
            run.concurrent = handle.concurrent
            run.log(status)


class _Progress:
    """A bar (tokens, tokens/s) that comes into being only once a request has run for
    `_PROGRESS_AFTER_S`: a short request makes no bar at all (in a notebook, even a bar
    never shown would leave a widget in the saved file)."""

    def __init__(self, total: int, name: str, enabled: bool) -> None:
        self.total, self.name, self.enabled = total, name, enabled
        self.started, self.done = time.perf_counter(), 0
        self.bar: Optional[Any] = None

    def update(self, tokens: int) -> None:
        self.done += tokens
        if self.bar is not None:
            self.bar.update(tokens)
        elif self.enabled and time.perf_counter() - self.started >= _PROGRESS_AFTER_S:
            self.bar = tqdm(total=self.total, initial=self.done, unit="tok", desc=self.name,
                            leave=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


@dataclass
class _ChoiceState:
    """One choice as this layer builds it from updates, and how much of it was streamed."""

    index: int
    prompt_index: int
    out: TokenLog = field(default_factory=TokenLog)
    entries: list = field(default_factory=list)   # new-format entries of `out`'s tokens
    finish_reason: Optional[str] = None
    stop_at: Optional[int] = None         # where a stop string begins in the text
    opened: bool = False                  # has had its first chunk
    streamed_text: int = 0                # characters already sent in chunks
    streamed_tokens: int = 0              # tokens already sent in chunks

    @property
    def text(self) -> str:
        """The returned text: generated text up to any stop string."""
        text = self.out.text.text
        return text if self.stop_at is None else text[:self.stop_at]


def _one_token_each(update: Update) -> list[Update]:
    """`update` in parts that give each row at most one token (its finish with its last),
    so that a stream sends a chunk per token, as the hosted API does, however many tokens
    one engine update holds (steps drawn ahead, accepted guesses)."""
    longest = max((len(r.tokens) for r in update.rows), default=0)
    if longest <= 1:
        return [update]
    parts = []
    for k in range(longest):
        rows = tuple(RowUpdate(r.index, r.tokens[k:k + 1],
                               *((r.finish_reason, r.stop_at)
                                 if k == max(len(r.tokens), 1) - 1 else (None, None)))
                     for r in update.rows if k < max(len(r.tokens), 1))
        parts.append(dataclasses.replace(update, rows=rows, done=update.done and
                                         k == longest - 1))
    return parts


class _Run:
    """One request on the engine, turned into a response or into chunks."""

    def __init__(self, llm: "LLM", req: CompletionRequest, job: Job, model: str,
                 started: float, tokenized: float) -> None:
        self.llm, self.req, self.job, self.model = llm, req, job, model
        self.started, self.tokenized = started, tokenized
        self.id = f"cmpl-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.names = llm.completions.names
        self.stops = StopStrings(req.stop_sequences)
        self.choices = [_ChoiceState(r, r // job.n) for r in range(job.rows)]
        self.echoes = [TokenLog() for _ in job.prompts]
        # New-format entries are built as the tokens arrive, once, for whole responses,
        # chunks and raw output alike (on a GPU, while the engine computes the next
        # steps); the legacy format needs them only for raw output.
        self.builds_entries = wants_content(req) and (req.logprobs_format != "legacy"
                                                      or bool(req.raw_output))
        self.echo_entries: list[list] = [[] for _ in job.prompts]
        self.cached = [0] * len(job.prompts)
        self.timings: dict[str, float] = {}
        self.concurrent = 1

    def apply(self, update: Update, part: int = 0) -> list[_ChoiceState]:
        """Take this request's share of an update (the `part`-th of a merged job) and
        return the choices it changed."""
        rows, prompts = self.job.rows, len(self.job.prompts)
        self.timings = update.timings
        if update.echoes is not None:
            for log, tokens in zip(self.echoes, update.echoes[part * prompts:]):
                for token in tokens:
                    log.add(token)
                log.text.finish()
            if self.builds_entries:
                self.echo_entries = [self._new_entries(log, 0, 0) for log in self.echoes]
            self.cached = list(update.cached_tokens[part * prompts:(part + 1) * prompts])
        changed = []
        for row in update.rows:
            if not part * rows <= row.index < (part + 1) * rows:
                continue
            c = self.choices[row.index - part * rows]
            before = len(c.out)
            for token in row.tokens:
                c.out.add(token)
            if self.builds_entries:
                # (offsets count the echoed text, which comes first in the choice's text)
                c.entries += self._new_entries(
                    c.out, before, len(self.echoes[c.prompt_index].text.text), True)
            if row.finish_reason is not None:
                c.finish_reason, c.stop_at = row.finish_reason, row.stop_at
                c.out.text.finish()
            changed.append(c)
        return changed

    def complete(self) -> LocalCompletion:
        with collector_held():
            _run_together(self.llm, [self])
            return self.response()

    def response(self) -> LocalCompletion:
        return LocalCompletion(
            id=self.id, created=self.created, model=self.model,
            choices=[self._choice(c) for c in self.choices], usage=self._usage(),
            perf_metrics=self._perf(),
            details={c.index: self._details(c, 0, len(c.out), True) for c in self.choices})

    def stream(self) -> Iterator[LocalChunk]:
        handle = self.llm.engine.submit(self.job)
        self.concurrent = handle.concurrent
        status = "cancelled"
        try:
            for update in map(_one_token_each, handle):
                for part in update:
                    changed = self.apply(part)
                    if part.echoes is not None:  # after the prefill: echoes, finished rows
                        changed = [c for c in self.choices
                                   if c.finish_reason or self.job.echo[c.prompt_index]]
                    if part.done:
                        status = "completed"
                    for k, c in enumerate(changed):
                        yield self._chunk(c, last=part.done and k == len(changed) - 1)
        except CancelledError:
            raise                       # (a `CancelScope` dropped it: "cancelled")
        except Exception:
            status = "error"
            raise
        finally:
            handle.close()
            self.log(status)

    # ---------------------------------------------------------------- choices and chunks

    def _spans(self, c: _ChoiceState, start: int, end: int, with_echo: bool
               ) -> list[tuple[TokenLog, int, int, int]]:
        """The choice's tokens [start, end), after its echoed prompt when `with_echo`:
        (log, start, end, text offset of the log's text in the choice's) each."""
        echo = self.echoes[c.prompt_index]
        return ([(echo, 0, len(echo), 0)] if with_echo else []) + \
            [(c.out, start, end, len(echo.text.text))]

    def _new_entries(self, log: TokenLog, start: int, shift: int, generated: bool = False
                     ) -> list:
        """New-format entries of a log's tokens from `start` on, offsets shifted by
        `shift`; sampling logprobs only for `generated` tokens."""
        return content_entries(log, start, len(log), shift, self.names, generated,
                               self.job.capture.tracked)

    def _entries(self, c: _ChoiceState, start: int, end: int, with_echo: bool
                 ) -> Optional[list]:
        """The new-format entries of the choice's tokens [start, end), after its echoed
        prompt's `with_echo`; None where the request wants none."""
        if not self.builds_entries:
            return None
        return (self.echo_entries[c.prompt_index] if with_echo else []) + \
            c.entries[start:end]

    def _logprobs(self, c: _ChoiceState, start: int, end: int, with_echo: bool) -> Any:
        """The choice's `logprobs` field (the legacy format is built from the tokens)."""
        if self.req.logprobs_format == "legacy":
            return legacy_logprobs(self._spans(c, start, end, with_echo), self.names)
        entries = self._entries(c, start, end, with_echo)
        return None if entries is None else NewLogprobs(content=entries)

    def _details(self, c: _ChoiceState, start: int, end: int, with_echo: bool
                 ) -> ChoiceDetails:
        echo, prompt = self.echoes[c.prompt_index], self.job.prompts[c.prompt_index]
        logs = [(log, a, b) for log, a, b, _ in self._spans(c, start, end, with_echo)]
        first = len(prompt) - len(echo) if with_echo else len(prompt) + start
        return details(c.prompt_index, len(prompt), logs, first, self.names,
                       self.job.capture.layers, self.llm.info.num_layers)

    def _raw_output(self, c: _ChoiceState) -> Any:
        """The choice's raw output when asked for."""
        if not self.req.raw_output:
            return None
        entries = self._entries(c, 0, len(c.out), True)
        return raw_output(self.req, self.job, c.prompt_index, c.out,
                          self.echoes[c.prompt_index], entries)

    def _choice(self, c: _ChoiceState) -> Choice:
        req = self.req
        return Choice(
            index=c.index, text=self.echoes[c.prompt_index].text.text + c.text,
            finish_reason=c.finish_reason, logprobs=self._logprobs(c, 0, len(c.out), True),
            raw_output=self._raw_output(c),
            prompt_token_ids=list(self.job.prompts[c.prompt_index]) if req.return_token_ids
            else None,
            token_ids=c.out.ids if req.return_token_ids else None)

    def _chunk(self, c: _ChoiceState, last: bool) -> LocalChunk:
        """A chunk with what is new for a choice since its last one: text that can no
        longer turn into a stop string, the tokens generated since, and once finished its
        finish reason and raw output; the request's last chunk carries usage and perf."""
        req, first = self.req, not c.opened
        c.opened = True
        text = c.text if c.finish_reason else c.out.text.text
        upto = len(text) if c.finish_reason else len(text) - self.stops.holdback(text)
        delta = (self.echoes[c.prompt_index].text.text if first else "") + \
            text[c.streamed_text:upto]
        start, end = c.streamed_tokens, len(c.out)
        c.streamed_text, c.streamed_tokens = max(upto, c.streamed_text), end
        choice = Choice(
            index=c.index, text=delta, finish_reason=c.finish_reason,
            logprobs=self._logprobs(c, start, end, first),
            raw_output=self._raw_output(c) if c.finish_reason else None,
            prompt_token_ids=list(self.job.prompts[c.prompt_index])
            if req.return_token_ids and first else None,
            token_ids=c.out.ids[start:end] if req.return_token_ids else None)
        return LocalChunk(id=self.id, created=self.created, model=self.model,
                          choices=[choice], usage=self._usage() if last else None,
                          perf_metrics=self._perf() if last else None,
                          details={c.index: self._details(c, start, end, first)})

    def _usage(self) -> Any:
        return usage(self.job, sum(len(c.out) for c in self.choices), sum(self.cached))

    def _perf(self) -> Any:
        if not self.req.perf_metrics_in_response:
            return None
        return perf_metrics(self.job, self.timings, self.model, self.started, self.tokenized,
                            self.concurrent, sum(self.cached), [c.out for c in self.choices])

    def log(self, status: str) -> None:
        req = self.req
        timings = perf_metrics(self.job, self.timings, self.model, self.started,
                               self.tokenized, self.concurrent, sum(self.cached),
                               [c.out for c in self.choices]) \
            if "prefill_end" in self.timings else {}
        self.llm.request_log.record({
            "id": self.id, "created": self.created, "model": self.model, "status": status,
            "user": req.user, "metadata": req.metadata,
            "params": req.model_dump(exclude_none=True, exclude_defaults=True),
            "usage": self._usage().model_dump() if self.timings else None,
            "finish_reasons": [c.finish_reason for c in self.choices],
            "timings": {k: v for k, v in timings.items() if isinstance(v, (int, float))},
        })

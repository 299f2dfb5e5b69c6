"""Finding and loading models: embedded zoo names, local folders, hub ids.

`load_pretrained` returns the HF model and tokenizer together with a `ModelInfo` that says
what the rest of the toolkit needs to know about them (context window, special tokens, MoE
shape, think tokens), read once here so the engine never pokes at config attributes whose
names differ between architectures.
"""
from __future__ import annotations

import difflib
import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import InvalidRequestError, NotFoundError

ZOO_DIR = Path(__file__).parent / "zoo"
ZOO_NAMES = ("tiny-code", "tiny-code-moe", "tiny-code-draft")
DEFAULT_MODEL = "tiny-code"
THINK_TOKENS = ("<think>", "</think>")
# Thinking-token budgets of `reasoning_effort` 'low', 'medium' and 'high' for a model whose
# card (its config's `reasoning_budgets`) declares none.
DEFAULT_REASONING_BUDGETS = {"low": 256, "medium": 1024, "high": 4096}
_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16,
           "fp16": torch.float16, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
_HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


@dataclass(frozen=True)
class ModelInfo:
    """What the toolkit knows about a loaded model, independent of its architecture."""

    name: str
    source: str                      # "zoo", "local" or "hub"
    path: str                        # folder or hub id the weights came from
    architecture: str
    context_length: int
    vocab_size: int
    num_layers: int
    hidden_size: int
    num_parameters: int
    bos_token_id: Optional[int]
    eos_token_ids: tuple[int, ...]
    pad_token_id: Optional[int]
    special_tokens: dict[str, int] = field(default_factory=dict)
    num_experts: Optional[int] = None
    experts_per_token: Optional[int] = None
    num_moe_layers: int = 0
    think_token_ids: Optional[tuple[int, int]] = None   # (start, end) of a think block
    reasoning_budgets: dict[str, int] = field(
        default_factory=lambda: dict(DEFAULT_REASONING_BUDGETS))
    image_token: Optional[str] = None   # a vision-language model's image placeholder
    # sampling knobs the model's card recommends (its generation_config.json); requests
    # keep the API's defaults, the CLI starts from these
    sampling: dict[str, float] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.num_moe_layers > 0


def resolve_device(device: Union[str, torch.device, None]) -> torch.device:
    """`None` picks CUDA when present, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise InvalidRequestError(f"device {device!r} is not a torch device", "device") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError("device 'cuda' asked for, but no CUDA GPU is available",
                                  "device")
    return dev


def resolve_dtype(dtype: Union[str, torch.dtype, None], device: torch.device) -> torch.dtype:
    """`None` means bfloat16 on a GPU and float32 on a CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.removeprefix("torch.")]
    raise InvalidRequestError(f"dtype {dtype!r} is not one of float32, float16, bfloat16",
                              "dtype")


def locate(name_or_path: Union[str, os.PathLike]) -> tuple[str, str]:
    """Return (source, location): a zoo name, an existing local folder, or a hub id."""
    text = os.fspath(name_or_path)
    if text in ZOO_NAMES:
        folder = ZOO_DIR / text
        if not (folder / "config.json").exists():
            raise NotFoundError(f"embedded model '{text}' is not installed with this copy of "
                                f"toolkit (expected in {folder})", "model")
        return "zoo", str(folder)
    path = Path(text).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise NotFoundError(f"'{text}' is not a model folder: it has no config.json",
                                "model")
        return "local", str(path)
    if text.startswith((".", "/", "~")) or not _HUB_ID.fullmatch(text):
        raise NotFoundError(f"no model folder at '{text}'", "model")
    return "hub", text


@dataclass(frozen=True)
class LoadedModel:
    model: Any          # a transformers PreTrainedModel, in eval mode
    tokenizer: Any      # its transformers tokenizer
    info: ModelInfo
    processor: Any = None   # a vision-language model's processor (images and text)


def input_device(model: Any) -> torch.device:
    """Where a model's inputs go: its input embedding's device, or for a model split
    across devices by accelerate (`device_map`), the device that layer executes on
    (its weights may be offloaded to the CPU or disk in between)."""
    embed = model.get_input_embeddings()
    executes = getattr(getattr(embed, "_hf_hook", None), "execution_device", None)
    if executes is None:
        return embed.weight.device
    return torch.device(f"cuda:{executes}" if isinstance(executes, int) else executes)


def placements(model: Any) -> list[str]:
    """The distinct places accelerate put a split model's modules (`cpu`, `disk`, CUDA
    devices as `cuda:N`); empty for a model on one device."""
    found = dict.fromkeys(f"cuda:{d}" if isinstance(d, int) else str(d)
                          for d in (getattr(model, "hf_device_map", None) or {}).values())
    return list(found) if len(found) > 1 or set(found) & {"disk", "meta"} else []


def load_pretrained(name_or_path: Union[str, os.PathLike], device: torch.device,
                    dtype: torch.dtype, device_map: Union[str, dict, None] = None,
                    max_memory: Optional[dict] = None) -> LoadedModel:
    """Load a model and its tokenizer onto `device` in `dtype` (or with a `device_map`,
    spread by accelerate within `max_memory`, what does not fit offloaded to disk); a
    vision-language model (its config has a `vision_config`) with its processor."""
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText,
                              AutoProcessor, AutoTokenizer)
    from transformers.utils import logging as hf_logging

    source, location = locate(name_or_path)
    hf_logging.disable_progress_bar()   # a load bar per call clutters notebook cells

    def fetch(loader: Any, **kwargs: Any) -> Any:
        if source != "hub":
            return loader.from_pretrained(location, **kwargs)
        return _from_hub(loader, location, **kwargs)

    placing: dict[str, Any] = {}
    if device_map is not None:
        placing = dict(device_map=device_map, max_memory=max_memory,
                       offload_folder=tempfile.mkdtemp(prefix="toolkit-offload-"))
        # its note that offloaded weights sit on the meta device: the LLM's repr says where
        logging.getLogger("accelerate.big_modeling").setLevel(logging.ERROR)
    processor = None
    if getattr(fetch(AutoConfig), "vision_config", None) is not None:
        processor = fetch(AutoProcessor)
        tokenizer = processor.tokenizer
        model = fetch(AutoModelForImageTextToText, dtype=dtype, **placing)
    else:
        tokenizer = fetch(AutoTokenizer)
        model = fetch(AutoModelForCausalLM, dtype=dtype, **placing)
    model = (model if device_map is not None else model.to(device)).eval()
    info = describe(model, tokenizer, os.fspath(name_or_path), source, location, processor)
    return LoadedModel(model, tokenizer, info, processor)


def _from_hub(loader: Any, hub_id: str, **kwargs: Any) -> Any:
    """Use the local HF cache first; go online only when allowed and needed. A name
    without an organisation (`tiny-coder`) is far likelier a typo than one of the hub's
    few legacy unprefixed ids, so it is looked up in the cache only, and fails at once with
    the closest names we know instead of after a minute of network retries."""
    try:
        return loader.from_pretrained(hub_id, local_files_only=True, **kwargs)
    except OSError as cached_exc:
        if "/" not in hub_id:
            raise NotFoundError(_unknown_name(hub_id), "model") from cached_exc
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        if offline:
            raise NotFoundError(f"hub model '{hub_id}' is not in the local Hugging Face cache "
                                f"and HF_HUB_OFFLINE is set", "model") from cached_exc
    try:
        return loader.from_pretrained(hub_id, **kwargs)
    except OSError as exc:
        raise NotFoundError(f"hub model '{hub_id}' could not be loaded: not in the local "
                            f"Hugging Face cache, and the hub did not provide it ({exc}). "
                            f"Without network access, set HF_HUB_OFFLINE=1 so that a missing "
                            f"model fails at once instead of after retries", "model") from exc


def _unknown_name(name: str) -> str:
    """Say that `name` is neither an embedded model, a folder nor a cached hub model,
    with the closest embedded name when there is one."""
    close = difflib.get_close_matches(name, ZOO_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return (f"no model named '{name}'{hint} Embedded models: "
            f"{', '.join(ZOO_NAMES)}; or give a local folder, or a hub id as 'org/name'")


def describe(model: Any, tokenizer: Any, name: str, source: str, path: str,
             processor: Any = None) -> ModelInfo:
    """Read a model's shape and special tokens into a `ModelInfo`."""
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") \
        else model.config
    moe_layers = [m for m in model.modules() if hasattr(m, "gate") and hasattr(m, "experts")]
    return ModelInfo(
        name=name, source=source, path=path,
        architecture=(model.config.architectures or [type(model).__name__])[0],
        context_length=_context_length(cfg, tokenizer),
        vocab_size=model.get_input_embeddings().num_embeddings,
        num_layers=_first_attr(cfg, "num_hidden_layers", "n_layer", "num_layers"),
        hidden_size=_first_attr(cfg, "hidden_size", "n_embd", "d_model"),
        num_parameters=sum(p.numel() for p in model.parameters()),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_ids=_eos_ids(model, tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        special_tokens={tok: tokenizer.convert_tokens_to_ids(tok)
                        for tok in tokenizer.all_special_tokens},
        num_experts=_first_attr(cfg, "num_local_experts", "num_experts", "n_routed_experts")
        if moe_layers else None,
        experts_per_token=_first_attr(cfg, "num_experts_per_tok", "moe_topk", "top_k")
        if moe_layers else None,
        num_moe_layers=len(moe_layers),
        think_token_ids=_think_ids(cfg, tokenizer),
        reasoning_budgets={**DEFAULT_REASONING_BUDGETS,
                           **(getattr(cfg, "reasoning_budgets", None) or {})},
        image_token=getattr(processor, "image_token", None),
        sampling=_recommended_sampling(model),
    )


SAMPLING_KNOBS = ("temperature", "top_p", "top_k", "min_p", "typical_p",
                  "repetition_penalty", "frequency_penalty", "presence_penalty")


def _recommended_sampling(model: Any) -> dict[str, float]:
    """The sampling knobs a model's generation config sets away from their defaults."""
    config = getattr(model, "generation_config", None)
    changed = config.to_diff_dict() if config is not None else {}
    return {k: changed[k] for k in SAMPLING_KNOBS if changed.get(k) is not None}


def _first_attr(cfg: Any, *names: str) -> Any:
    for name in names:
        if getattr(cfg, name, None) is not None:
            return getattr(cfg, name)
    raise ValueError(f"model config has none of {names}")


def _context_length(cfg: Any, tokenizer: Any) -> int:
    try:
        return int(_first_attr(cfg, "max_position_embeddings", "n_positions",
                               "max_sequence_length", "seq_length"))
    except ValueError:
        if tokenizer.model_max_length < 10**7:   # HF's "unset" value is ~1e30
            return int(tokenizer.model_max_length)
        raise


def _eos_ids(model: Any, tokenizer: Any) -> tuple[int, ...]:
    ids: set[int] = set()
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "eos_token_id", None),
                  getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if value is not None:
            ids.update([value] if isinstance(value, int) else value)
    return tuple(sorted(ids))


def _think_ids(cfg: Any, tokenizer: Any) -> Optional[tuple[int, int]]:
    """Think tokens come from the config's `think_tokens` or, failing that, from tokens
    named `<think>`/`</think>` in the tokenizer (Qwen3, DeepSeek-R1 style)."""
    names = getattr(cfg, "think_tokens", None) or THINK_TOKENS
    vocab = tokenizer.get_vocab()
    if all(tok in vocab for tok in names):
        return vocab[names[0]], vocab[names[1]]
    if getattr(cfg, "think_tokens", None):
        raise ValueError(f"config declares think tokens {names} the tokenizer lacks")
    return None

"""toolkit: the `/v1/completions` API in-process, on a local Hugging Face model."""
from . import errors, schema
from .llm import LLM, load

__all__ = ["LLM", "errors", "load", "schema"]
__version__ = "0.1.0"

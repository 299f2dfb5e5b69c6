"""toolkit: the `/v1/completions` API in-process, on a local Hugging Face model, with every
number it returns as a pandas DataFrame."""
from . import errors, frames, plots, schema, widgets
from .compare import compare
from .llm import LLM, load
from .remote import remote
from .score import score
from .serve import serve
from .sweep import sweep

__all__ = ["LLM", "compare", "errors", "frames", "load", "plots", "remote", "schema", "score",
           "serve", "sweep", "widgets"]
__version__ = "0.1.0"

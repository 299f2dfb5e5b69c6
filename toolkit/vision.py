"""Image inputs (`images`) for vision-language models: data URLs decoded, and each prompt
run through the model's processor, which expands its image placeholders into the tokens
the image's features will fill and turns its images into pixel values."""
from __future__ import annotations

import base64
import binascii
import io
from typing import Any, Sequence

from .errors import InvalidRequestError


def decode(url: str) -> Any:
    """A `data:image/...;base64,...` URL as an RGB PIL image."""
    from PIL import Image, UnidentifiedImageError

    header, _, data = url.partition(",")
    try:
        raw = base64.b64decode(data, validate=True)
        return Image.open(io.BytesIO(raw)).convert("RGB")
    except (binascii.Error, ValueError, UnidentifiedImageError, OSError) as err:
        raise InvalidRequestError(f"images: {header[:40]!r}... is not a readable base64 "
                                  f"image ({type(err).__name__})", "images") from None


def prepare(processor: Any, placeholder: str, prompts: Sequence[Any], urls: Sequence[str]
            ) -> list[tuple[list[int], dict[str, Any]]]:
    """Each prompt's token ids (placeholders expanded) and model inputs (pixel values and
    the like; empty for a prompt without images). The images fill the placeholders of the
    prompts in order, and their count must equal the placeholders'."""
    if any(not isinstance(p, str) for p in prompts):
        raise InvalidRequestError("images need text prompts (where the processor can find "
                                  f"and expand each {placeholder!r} placeholder)", "images")
    counts = [p.count(placeholder) for p in prompts]
    if sum(counts) != len(urls):
        raise InvalidRequestError(f"images: {len(urls)} image(s) for {sum(counts)} "
                                  f"{placeholder!r} placeholder(s) in the prompt", "images")
    images = [decode(url) for url in urls]
    out = []
    for prompt, count in zip(prompts, counts):
        mine, images = images[:count], images[count:]
        encoded = processor(text=prompt, images=mine or None, return_tensors="pt")
        ids = encoded.pop("input_ids")[0].tolist()
        encoded.pop("attention_mask", None)
        out.append((ids, dict(encoded)))
    return out

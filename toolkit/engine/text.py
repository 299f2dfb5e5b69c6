"""Tokens to bytes to text, incrementally, and stop strings matched on that text.

A token's piece is a run of bytes, not always whole characters (byte-level BPE splits
multi-byte characters), so text is built by feeding each token's true bytes to an
incremental UTF-8 decoder: a token's `text_offset` is the length of the text decoded before
it, and a character spanning two tokens appears when its last byte does.
"""
from __future__ import annotations

import codecs
import json
import re
from typing import Any, Optional, Sequence

from transformers.convert_slow_tokenizer import bytes_to_unicode


def token_bytes_table(tokenizer: Any) -> list[bytes]:
    """The bytes each token id stands for, for byte-level BPE (GPT-2, Llama 3, Qwen),
    SentencePiece-style (`▁` for space, `<0xNN>` byte fallback) and, failing both, what
    the tokenizer decodes the id to alone."""
    size = len(tokenizer)
    pieces = tokenizer.convert_ids_to_tokens(list(range(size)))
    added = {t.content for t in tokenizer.added_tokens_decoder.values()}
    decoder = json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder") or {}
    kinds = json.dumps(decoder)
    table: list[bytes] = []
    if '"ByteLevel"' in kinds:
        byte_of = {ch: b for b, ch in bytes_to_unicode().items()}
        for piece in pieces:
            if piece in added or any(ch not in byte_of for ch in piece):
                table.append(piece.encode())
            else:
                table.append(bytes(byte_of[ch] for ch in piece))
    elif "▁" in kinds or '"ByteFallback"' in kinds:
        for piece in pieces:
            m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", piece or "")
            table.append(bytes([int(m.group(1), 16)]) if m else
                         (piece or "").replace("▁", " ").encode())
    else:
        table = [tokenizer.decode([i]).encode() for i in range(size)]
    return table


class TextBuilder:
    """Text of a token stream, with each token's offset into it."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, piece: bytes) -> int:
        """Append a token's bytes; return its text offset. When earlier tokens left an
        incomplete character that this token's bytes do not complete, its U+FFFD comes
        out first, and belongs to them: the offset is past it."""
        offset = len(self.text)
        pending = self._decoder.getstate()[0]
        out = self._decoder.decode(piece)
        if pending:
            broken = pending.decode("utf-8", "replace")
            alone = codecs.getincrementaldecoder("utf-8")(errors="replace").decode(piece)
            if out == broken + alone:
                offset += len(broken)
        self.text += out
        return offset

    def finish(self) -> str:
        """Flush a trailing partial character (as U+FFFD, like `tokenizer.decode`)."""
        self.text += self._decoder.decode(b"", final=True)
        return self.text


class StopStrings:
    """Up to four stop strings, searched for in text as it grows."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.longest = max((len(s) for s in self.stops), default=0)

    def find(self, text: str, new_from: int) -> Optional[int]:
        """Where the earliest stop string starts, looking only at matches that end in the
        text added since `new_from` (earlier text was searched already)."""
        if not self.stops:
            return None
        start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits) if hits else None

    def holdback(self, text: str) -> int:
        """How many trailing characters could still begin a stop string, and so must not
        be streamed yet."""
        for n in range(min(self.longest - 1, len(text)), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stops):
                return n
        return 0

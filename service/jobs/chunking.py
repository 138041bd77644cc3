"""Documents → chunks: windows of `size` characters that overlap by `overlap`, cut at a paragraph,
line, sentence or word boundary in the window's second half when there is one, so chunks rarely
split a word. Characters, not tokens: it needs no tokenizer and no model thread, and at the
default 800 characters a chunk stays inside MiniLM's 256-token window for English prose."""

from __future__ import annotations

import re

_BREAKS = ("\n\n", "\n", ". ", "? ", "! ", " ")
_SPACE = re.compile(r"\s")


def chunk_text(text: str, size: int, overlap: int) -> list[str]:
    if size < 1 or not 0 <= overlap * 2 <= size:
        raise ValueError("need size >= 1 and 0 <= overlap <= size / 2")
    text = text.strip()
    chunks: list[str] = []
    start = 0
    while start < len(text):
        end = min(start + size, len(text))
        if end < len(text):
            for mark in _BREAKS:
                cut = text.rfind(mark, start + size // 2, end)
                if cut != -1:
                    end = cut + len(mark)
                    break
        piece = text[start:end].strip()
        if piece:
            chunks.append(piece)
        if end >= len(text):
            break
        # The next window starts `overlap` back, moved forward to the start of a word.
        nxt = max(end - overlap, start + 1)
        if overlap and (space := _SPACE.search(text, nxt, end)) is not None:
            nxt = space.end()
        start = nxt
    return chunks

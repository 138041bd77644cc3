from __future__ import annotations

import itertools
import re

import pytest

from service.jobs.chunking import chunk_text
from service.settings import SettingsError, parse_settings

TEXT = " ".join(f"Sentence {i} says something about item {i * 7}." for i in range(200))


@pytest.mark.parametrize(("size", "overlap"), [(100, 0), (200, 40), (800, 100), (800, 400)])
def test_chunks_are_bounded_overlap_and_cover_every_word(size: int, overlap: int) -> None:
    chunks = chunk_text(TEXT, size, overlap)
    assert all(0 < len(c) <= size for c in chunks)
    words = TEXT.split()
    seen = [w for c in chunks for w in c.split()]
    assert set(seen) == set(words)  # nothing lost
    for c in chunks:  # cut between words, never inside one
        assert c.split()[0] in words and c.split()[-1] in words
    if overlap:
        # Each chunk starts inside the previous one: its first words end the previous chunk.
        for previous, current in itertools.pairwise(chunks):
            assert current.split()[0] in previous.split()[-overlap // 5 - 3 :]
    else:
        assert " ".join(chunks).split() == words


def test_prefers_paragraph_then_sentence_breaks() -> None:
    text = "First paragraph. " * 20 + "\n\n" + "Second paragraph here. " * 20
    chunks = chunk_text(text, 400, 0)
    assert chunks[0].endswith("First paragraph.") and chunks[1].startswith("Second paragraph")
    assert all(re.search(r"\.$", c) for c in chunks[:-1])


def test_short_blank_and_unbroken_text() -> None:
    assert chunk_text("  one line  ", 100, 10) == ["one line"]
    assert chunk_text(" \n\t ", 100, 10) == []
    blob = "x" * 1000  # no boundary to cut at: hard cuts, still bounded and making progress
    assert [len(c) for c in chunk_text(blob, 300, 50)] == [300, 300, 300, 250]
    with pytest.raises(ValueError):
        chunk_text("abc", 100, 60)


def test_chunk_settings_are_checked() -> None:
    assert parse_settings({"CHUNK_SIZE": "400", "CHUNK_OVERLAP": "200"}).chunk_overlap == 200
    with pytest.raises(SettingsError, match="CHUNK_OVERLAP='300': at most half of CHUNK_SIZE"):
        parse_settings({"CHUNK_SIZE": "400", "CHUNK_OVERLAP": "300"})
    with pytest.raises(SettingsError, match="CHUNK_SIZE"):
        parse_settings({"CHUNK_SIZE": "50"})
    with pytest.raises(SettingsError, match="did you mean COLLECTIONS_DIR"):
        parse_settings({"COLLECTION_DIR": "x"})

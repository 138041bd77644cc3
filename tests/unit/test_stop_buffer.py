from __future__ import annotations

import pytest

from backends.base import StopBuffer


def run(pieces: list[str], stops: list[str]) -> tuple[list[str], bool]:
    buf, out = StopBuffer(stops), []
    for piece in pieces:
        text, hit = buf.feed(piece)
        if text:
            out.append(text)
        if hit:
            return out, True
    if tail := buf.flush():
        out.append(tail)
    return out, False


def test_no_stops_passes_everything_through() -> None:
    assert run(["a", "b"], []) == (["a", "b"], False)


def test_stop_split_across_pieces_is_never_emitted() -> None:
    out, hit = run(["Hello wo", "rld", " EN", "D more"], [" END"])
    assert hit and "".join(out) == "Hello world"
    assert all("E" not in piece for piece in out)


def test_held_text_is_released_when_it_stops_matching() -> None:
    out, hit = run(["ab", "<", "/x", "y"], ["</s>"])
    assert not hit and "".join(out) == "ab</xy"


@pytest.mark.parametrize("stops", [["\n\n", "###"], ["###", "\n\n"]])
def test_earliest_stop_wins(stops: list[str]) -> None:
    out, hit = run(["one\n\ntwo###"], stops)
    assert hit and "".join(out) == "one"


def test_flush_returns_a_partial_match_at_the_end() -> None:
    assert run(["abc", "<en"], ["<end>"]) == (["abc", "<en"], False)

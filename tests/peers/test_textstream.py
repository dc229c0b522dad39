"""Text deltas with stop strings."""

from peers.textstream import TextStream


class CharTokenizer:
    """Token i is chr(i): enough to drive TextStream."""

    def decode(self, ids):
        return "".join(chr(i) for i in ids)


def feed(text: str, stop: list[str]) -> tuple[list[str], TextStream]:
    stream = TextStream(CharTokenizer(), stop)
    out = [stream.push(ord(c)) for c in text if not stream.stopped]
    return [*out, stream.finish()], stream


def test_text_is_held_only_while_it_may_begin_a_stop_string():
    deltas, stream = feed("hello world", ["wox"])
    assert "".join(deltas) == "hello world" and not stream.stopped
    assert deltas[6] == "" and deltas[7] == ""  # "w", "wo" held back...
    assert deltas[8] == "wor"  # ...then let go at once


def test_earliest_stop_string_wins():
    deltas, stream = feed("xab", ["b", "a"])
    assert "".join(deltas) == "x" and stream.stopped


def test_stop_string_split_over_tokens():
    deltas, stream = feed("one two three", ["two"])
    assert "".join(deltas) == "one " and stream.stopped

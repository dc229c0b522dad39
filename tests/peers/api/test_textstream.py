"""Text deltas with stop strings."""

from peers.api.textstream import TextStream


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


def test_incremental_text_equals_a_full_decode(default_model):
    import random

    from inference import Tokenizer

    tok = Tokenizer(default_model)
    ids = tok.encode(
        "Héllo wörld! 日本語のテキスト, emojis 🎉🚀 and code: def f(x): return x ** 2  \n\n done."
    )
    rng = random.Random(0)
    for _ in range(200):
        seq = [rng.choice([*ids, rng.randrange(49152)]) for _ in range(rng.randrange(1, 50))]
        stream = TextStream(tok, [])
        text = "".join(stream.push(t) for t in seq) + stream.finish()
        full = tok.decode(seq)
        assert text == full or full.endswith("\ufffd"), (seq, text, full)

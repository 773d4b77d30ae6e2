from kv3d.engine.textstream import IncrementalText


def feed(stream: IncrementalText, pieces: list[bytes]) -> str:
    return "".join(stream.push(p) for p in pieces) + stream.finish()


def test_multibyte_character_split_across_tokens_is_released_whole():
    stream = IncrementalText()
    euro = "€".encode()  # 3 bytes
    assert stream.push(b"price " + euro[:1]) == "price "
    assert stream.push(euro[1:2]) == ""
    assert stream.push(euro[2:] + b"5") == "€5"
    assert stream.finish() == ""


def test_stop_string_split_across_tokens_is_cut_and_never_shown():
    stream = IncrementalText(stop=("END",))
    out = [stream.push(b"hello E"), stream.push(b"N"), stream.push(b"D and more")]
    assert "".join(out) == "hello "
    assert stream.stopped
    assert stream.push(b"later") == "" and stream.finish() == ""


def test_text_that_only_looks_like_a_stop_prefix_is_released_later():
    stream = IncrementalText(stop=("END",))
    assert stream.push(b"the E") == "the "  # "E" could start "END": held back
    assert stream.push(b"xit") == "Exit"
    assert not stream.stopped


def test_held_tail_is_flushed_when_output_ends_without_stop():
    stream = IncrementalText(stop=("</s>",))
    assert feed(stream, [b"a <", b"/"]) == "a </"
    assert not stream.stopped


def test_earliest_of_several_stop_strings_wins():
    stream = IncrementalText(stop=("world", "lo"))
    assert feed(stream, [b"hello world"]) == "hel"


def test_invalid_utf8_is_replaced_not_raised():
    assert feed(IncrementalText(), [b"ok \xff"]) == "ok \ufffd"


def test_character_cut_by_the_end_of_output_is_dropped_not_replaced():
    globe = "🌍".encode()  # 4 bytes
    assert feed(IncrementalText(), [b"hi ", globe[:2]]) == "hi "
    assert feed(IncrementalText(stop=("x",)), [b"hi ", globe, globe[:3]]) == "hi 🌍"


def test_invalid_bytes_before_the_end_are_still_replaced():
    assert feed(IncrementalText(), [b"a\xffb", "€".encode()[:1]]) == "a\ufffdb"

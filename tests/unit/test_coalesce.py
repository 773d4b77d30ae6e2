from kv3d.engine.generation import Finished, Rejected, TextDelta, TokenLogprob, Usage, coalesce


def lp(token: int) -> TokenLogprob:
    return TokenLogprob(token, b"x", -0.5)


def test_adjacent_text_merges_in_order_with_its_tokens_and_logprobs():
    end = Finished("stop", Usage(3, 3), text="!")
    events = [TextDelta("a", 1, (lp(1),)), TextDelta("b", 1, (lp(2),)), TextDelta("", 1), end]
    merged = coalesce(events)
    assert merged == [TextDelta("ab", 3, (lp(1), lp(2))), end]


def test_terminal_events_and_lone_deltas_pass_unchanged():
    assert coalesce([]) == []
    rejected = Rejected("queue_full", "busy", retry_after_s=1)
    assert coalesce([rejected]) == [rejected]
    assert coalesce([TextDelta("a", 1)]) == [TextDelta("a", 1)]


def test_interleaved_choices_merge_per_choice_and_never_across_a_finish():
    first_done = Finished("stop", Usage(3, 2), index=1, final=False)
    events = [
        TextDelta("a", 1, index=0),
        TextDelta("x", 1, index=1),
        TextDelta("b", 1, index=0),
        TextDelta("y", 1, index=1),
        first_done,
        TextDelta("c", 1, index=0),
    ]
    assert coalesce(events) == [
        TextDelta("ab", 2, index=0),
        TextDelta("xy", 2, index=1),
        first_done,
        TextDelta("c", 1, index=0),
    ]

"""The repeat comparison the API tests use: strict where logits agree, silent where they moved."""

from __future__ import annotations

import pytest

from tests.integration.sameness import Step, assert_same_while_logits_are

TOP = {"a": -0.1, "b": -2.5}


def test_a_different_token_for_the_same_logits_fails():
    with pytest.raises(AssertionError, match="position 1"):
        assert_same_while_logits_are(
            [Step("a", TOP), Step("a", TOP)], [Step("a", TOP), Step("b", TOP)]
        )


def test_texts_may_part_from_where_the_logits_moved():
    moved = {"a": -0.1000001, "b": -2.5}
    compared = assert_same_while_logits_are(
        [Step("a", TOP), Step("a", TOP), Step("a", TOP)],
        [Step("a", TOP), Step("b", moved), Step("c", TOP)],
    )
    assert compared == 1


def test_same_logits_throughout_means_same_length():
    assert assert_same_while_logits_are([Step("a", TOP)] * 2, [Step("a", TOP)] * 2) == 2
    with pytest.raises(AssertionError, match="2 != 1"):
        assert_same_while_logits_are([Step("a", TOP)] * 2, [Step("a", TOP)])

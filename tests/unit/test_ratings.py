"""The rating parser reads the ways models write `Rating: <n> ### Reason: <text>`, and never invents a number."""

from __future__ import annotations

import pytest

from stablealign.sandbox.ratings import ParsedRating, parse_rating


@pytest.mark.parametrize("text, score", [
    ("Rating: 5 ### Reason: it is kind.", 5),
    ("Rating:5###Reason:ok", 5),
    ("Rating: 5/7", 5),
    ("Rating: 6 / 7 ### Reason: fine", 6),
    ("**Rating**: 5", 5),
    ("**Rating:** 4\n**Reason:** a bit vague", 4),
    ("Rating: __5__ ### Reason: __ok__", 5),
    ("Rating - 5.", 5),
    ("Rating = 3", 3),
    ("a rating of 6 out of 7 since it is helpful", 6),
    ("Score: 4", 4),
    ("score: 2 - harmful", 2),
    ("I'd rate this a 3", 3),
    ("I would rate this answer as a 6 because it is polite.", 6),
    ("I'd rate this one a 5", 5),  # "one" is a word, the digit wins
    ("I would give it a 5 out of 7.", 5),
    ("rating: 2", 2),
    ("RATING: 7 ### REASON: perfect", 7),
    ("Sure! Here is my assessment.\n\nRating: 6\nReason: helpful and safe.\nHope this helps.", 6),
    ("Rating:\n\n**4**", 4),
    ("Rating: five ### Reason: mostly fine", 5),
    ("Rating: Seven out of seven", 7),
    ("I rate it four.", 4),
    ("The answer is good. 6/7", 6),
    ("5", 5),
    ("**6**.", 6),
    ("Seven", 7),
    ("Rating: 4.5/7", 5),  # decimals round half up
    ("Rating: 3.2", 3),
    ("The scale is 1-7. Rating: 3", 3),  # a quoted range is not a rating
    ("Rating: 1 to 7 -- I give it 6", 6),
    ("Rating: 3 ### Reason: 10 reasons to worry", 3),  # first rating decides
    ("Reason: it encourages theft. Rating: 1", 1),
])
def test_reads_the_score(text, score):
    assert parse_rating(text).score == score


@pytest.mark.parametrize("text", [
    "Rating: 0", "Rating: 8", "Rating: 10", "Rating: 10/10", "8/10", "Rating: 9 out of 10",
    "rating 3 out of 5",  # another scale: not rescaled, the caller asks again
    "Rating: -", "Rating: N/A", "Rating:__ ### Reason:__", "nothing here", "", "   ",
    "I cannot rate this.", "Rating: 5-6",  # a range is ambiguous
])
def test_out_of_range_or_garbage_is_none(text):
    parsed = parse_rating(text)
    assert parsed.score is None
    assert isinstance(parsed, ParsedRating)


def test_other_scale_argument():
    assert parse_rating("Rating: 9/10", scale=10).score == 9
    assert parse_rating("Rating: 9", scale=10).score == 9
    assert parse_rating("Rating: 4/7", scale=10).score is None


@pytest.mark.parametrize("text, reason", [
    ("Rating: 5 ### Reason: it is kind.", "it is kind."),
    ("Rating: 6\nReason: helpful and safe.", "helpful and safe."),
    ("Rating: 6.\n\nReason:\nThe answer is helpful.", "The answer is helpful."),
    ("**Rating**: 2\n**Reason**: encourages harm", "encourages harm"),
    ("Rating: 4\nThe answer is vague.", "The answer is vague."),
    ("Rating: 5/7 - decent but short", "decent but short"),
    ("Reason: it encourages theft. Rating: 1", "it encourages theft."),
    ("Rating: 3", ""),
    ("I'd rate this a 3", ""),
])
def test_reason(text, reason):
    assert parse_rating(text).reason == reason


def test_unparsable_keeps_text_as_reason():
    assert parse_rating("I refuse to judge this answer.").reason == "I refuse to judge this answer."

"""One batching rule under a token budget, shared by the generation engine and the scorer."""

from __future__ import annotations

from stablealign.core.batches import by_token_budget


def test_batches_padded_to_their_longest_stay_within_the_budget():
    lengths = [1, 2, 2, 3, 5, 8, 13]
    batches = by_token_budget(lengths, lambda n: n, 10)
    assert batches == [[1, 2, 2], [3, 5], [8], [13]]  # 4 x 3 = 12 is over; 2 x 5 = 10 fits; 13 goes alone
    assert [n for batch in batches for n in batch] == lengths  # every item once, in order
    assert all(len(b) * max(b) <= 10 or len(b) == 1 for b in batches)


def test_nothing_in_nothing_out_and_a_large_budget_takes_all():
    assert by_token_budget([], len, 10) == []
    assert by_token_budget(["a", "bb", "ccc"], len, 1000) == [["a", "bb", "ccc"]]

"""pipeline.selection: consumed-id bitmaps and the split of the rest of an epoch, against plain Python sets."""

from __future__ import annotations

import json

import numpy as np
import torch

from pipeline import selection


def test_bitmaps_round_trip_merge_and_survive_json_and_weights_only(tmp_path):
    a, b = selection.pack_ids([0, 5, 9], 10), selection.pack_ids(torch.tensor([5, 17]), 10)  # 17: past the count
    merged = selection.merge([a, None, b])
    assert set(np.flatnonzero(selection.unpack(merged, 10))) == {0, 5, 9, 17}
    assert selection.count(merged) == 4 and selection.merge([None, None]) is None
    assert selection.unpack(a, 10).shape == (16,)  # whole bytes: ids 10..15 unmarked
    assert json.loads(json.dumps({"c": merged}))["c"] == merged
    torch.save({"c": merged}, tmp_path / "x.pt")
    assert torch.load(tmp_path / "x.pt", weights_only=True)["c"] == merged


def test_rest_of_an_epoch_is_split_like_a_whole_one():
    order = np.random.default_rng(0).permutation(30)
    consumed = np.zeros(30, dtype=bool)
    consumed[order[:7]] = True
    rest = selection.remaining(order, consumed)
    assert rest.tolist() == [i for i in order.tolist() if i not in set(order[:7].tolist())]
    shares = [selection.rank_share(rest, r, 3, 2) for r in range(3)]
    assert [len(s) for s in shares] == [6, 6, 6]  # 23 left: 7 per rank, 3 full batches of 2 each, 5 dropped
    assert len(set(np.concatenate(shares).tolist())) == 18
    assert selection.rank_share(order, 1, 2, 5).tolist() == order[1::2][:15].tolist()

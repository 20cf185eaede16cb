"""`pipeline.protocol.Loader`: the DALI loader and the synthetic loader both satisfy it, and behave as it says
(epoch and position move as batches are handed out, state_dict() resumes after the last one, the skipped count the
trainer reports is the loader's own, close() frees)."""

import pipeline_shards as ps
import pytest

from pipeline import build_loader
from pipeline.protocol import Loader, LoaderStats
from pipeline.synthetic import SyntheticLoader
from training.metrics import skipped_samples

SMALL = dict(num_frames=4, stride=4, input_size=48)


def video_loader(state=None, directory=None):
    return build_loader(directory or ps.train_shards().directory, "pretrain", 5, seed=1, state=state, **SMALL)


def synthetic_loader(state=None):
    options = dict(num_samples=12, num_frames=4, input_size=32, patch_size=16, tubelet_size=2, seed=1)
    return SyntheticLoader("pretrain", 5, state=state, **options)


@pytest.mark.parametrize("make", [video_loader, synthetic_loader], ids=["video", "synthetic"])
def test_both_loaders_satisfy_the_protocol_and_keep_it(make):
    loader = make()
    assert isinstance(loader, Loader) and isinstance(loader.stats, LoaderStats)
    assert len(loader) == 2  # 12 samples, batches of 5, the partial one dropped
    assert (loader.epoch, loader.position) == (0, 0)
    first = next(iter(loader))
    assert first["video"].shape[0] == 5 and (loader.epoch, loader.position) == (0, 1)
    assert loader.stats.batches == 1 and loader.stats.samples == 5

    resumed = make(state=loader.state_dict())
    assert (resumed.epoch, resumed.position) == (0, 1)
    rest = list(resumed)
    assert len(rest) == 1 and (resumed.epoch, resumed.position) == (1, 0)
    assert not set(first["sample_id"].tolist()) & set(rest[0]["sample_id"].tolist())  # resumed after, not again
    assert skipped_samples(resumed) == resumed.stats.corrupt_samples == 0
    for each in (loader, resumed):
        each.close()


def test_the_skipped_count_is_the_loaders_corrupt_samples(tmp_path):
    shards = ps.make_corrupt_shards(tmp_path / "bad", [40] * 4, garbage_at=1, truncated_at=3)
    loader = build_loader(shards.directory, "pretrain", 2, **SMALL)
    assert isinstance(loader, Loader)
    ids = [i for batch in loader for i in batch["sample_id"].tolist()]
    assert len(ids) == 4 and not {1, 3} & set(ids)
    assert skipped_samples(loader) == loader.stats.corrupt_samples == 2
    loader.close()


def test_an_object_without_close_is_not_a_loader():
    class NoClose:
        stats, epoch, position = LoaderStats(), 0, 0

        def __len__(self):
            return 0

        def __iter__(self):
            return iter(())

        def state_dict(self):
            return {}

    assert not isinstance(NoClose(), Loader)
    NoClose.close = lambda self: None
    assert isinstance(NoClose(), Loader)

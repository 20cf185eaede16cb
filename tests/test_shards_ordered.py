"""`shards.ordered.ordered_window`, the bounded in-order submit window of the builder's local pool, its Ray tasks and
`apps.predict`: results in input order whatever order the work finishes in, never more than `window` in flight,
errors raised at once with the rest abandoned. Real threads; the work finishes out of order on purpose."""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

import pytest

from shards.ordered import ordered_window


class Window:
    """Submits `work(item)` to a thread pool and records how many items were in flight (submitted, not yet
    waited for) at each submission."""

    def __init__(self, pool: ThreadPoolExecutor, work) -> None:
        self.pool, self.work = pool, work
        self.in_flight, self.peak, self.submitted, self.waited = 0, 0, [], []
        self.lock = threading.Lock()

    def submit(self, item) -> Future:
        with self.lock:
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
            self.submitted.append(item)
        return self.pool.submit(self.work, item)

    def wait(self, item, future: Future):
        result = future.result()
        with self.lock:
            self.in_flight -= 1
            self.waited.append(item)
        return result


def later_items_first(item: int) -> int:
    """item ** 2, finishing sooner the later the item: in-order results cannot come from finishing order."""
    time.sleep(0.002 * (20 - item % 20))
    return item * item


@pytest.mark.parametrize("window", [1, 3, 8])
def test_results_come_in_input_order_with_at_most_window_in_flight(window):
    items = list(range(40))
    with ThreadPoolExecutor(8) as pool:
        w = Window(pool, later_items_first)
        got = list(ordered_window(items, w.submit, w.wait, window))
    assert got == [(i, i * i) for i in items]
    assert w.submitted == items and w.waited == items
    assert w.peak == window  # the bound is reached and never passed


def test_items_are_taken_only_as_the_window_moves():
    taken = []

    def feed():
        for i in range(100):
            taken.append(i)
            yield i

    with ThreadPoolExecutor(4) as pool:
        w = Window(pool, later_items_first)
        ordered = ordered_window(feed(), w.submit, w.wait, 5)
        for consumed, (item, result) in enumerate(ordered, start=1):
            assert result == item * item
            assert len(taken) <= consumed + 5  # a lazy feed of any length is read at most `window` ahead
            if consumed == 7:
                break
        ordered.close()
    assert len(taken) == 12  # 7 consumed + the window


def test_an_error_propagates_at_once_and_the_rest_is_abandoned():
    def fail_on_five(item: int) -> int:
        if item == 5:
            raise OSError(28, "No space left on device", f"item{item}")
        return item

    abandoned = []
    with ThreadPoolExecutor(4) as pool:
        w = Window(pool, fail_on_five)
        ordered = ordered_window(range(50), w.submit, w.wait, 4, abandon=abandoned.extend)
        got = []
        with pytest.raises(OSError, match="No space left"):
            for _, result in ordered:
                got.append(result)
    assert got == [0, 1, 2, 3, 4]
    assert w.submitted == list(range(9))  # nothing submitted after the error: 5 + the window
    assert len(abandoned) == 3 and all(isinstance(f, Future) for f in abandoned)  # items 6..8, still in flight


def test_a_consumer_that_stops_early_abandons_what_is_in_flight_and_a_finished_one_abandons_nothing():
    abandoned: list[list] = []
    with ThreadPoolExecutor(2) as pool:
        w = Window(pool, later_items_first)
        ordered = ordered_window(range(10), w.submit, w.wait, 3, abandon=abandoned.append)
        assert next(ordered) == (0, 0)
        ordered.close()
        assert [len(handles) for handles in abandoned] == [3]  # items 1..3
        list(ordered_window(range(4), w.submit, w.wait, 3, abandon=abandoned.append))
    assert len(abandoned) == 1


def test_a_window_below_one_is_refused():
    with pytest.raises(ValueError, match="window must be >= 1"):
        next(ordered_window([1], lambda item: item, lambda item, handle: handle, 0))

"""A bounded, in-order submit window: the one way the builder (local pool and Ray) and `apps.predict` hand
parallel work to a single consumer that must see the results in input order.

    for item, result in ordered_window(items, submit, wait, window=8):
        ...

`submit(item)` starts the work and returns a handle (a future, a Ray object ref); `wait(item, handle)` returns its
result. At most `window` items are submitted and not yet waited for, so memory stays bounded (each finished result
may hold a whole video) while fast items still run past a slow one; items are taken from `items` only as the
window moves, so `items` may be a lazy iterator of any length.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

Item = TypeVar("Item")
Handle = TypeVar("Handle")
Result = TypeVar("Result")


def ordered_window(
    items: Iterable[Item],
    submit: Callable[[Item], Handle],
    wait: Callable[[Item, Handle], Result],
    window: int,
    abandon: Callable[[list[Handle]], None] | None = None,
) -> Iterator[tuple[Item, Result]]:
    """(item, result) for every item of `items`, in their order, with at most `window` submitted and not yet
    waited for. The next item is submitted after the head's result is in and before the head is yielded, so the
    consumer's work overlaps the window's.

    An error raised by `submit` or `wait` propagates at once, and nothing more is submitted. When the iteration
    stops before the end (that error, or the consumer closing this generator), `abandon` gets the handles still in
    flight (to cancel them or kill their workers) instead of their results being awaited.
    """
    if window < 1:
        raise ValueError(f"window must be >= 1, got {window}")
    feed = iter(items)
    pending: deque[tuple[Item, Handle]] = deque()
    try:
        for item in itertools.islice(feed, window):
            pending.append((item, submit(item)))
        while pending:
            item, handle = pending.popleft()
            result = wait(item, handle)
            del handle  # a Ray object ref: the object store frees the result once no ref is left
            for following in itertools.islice(feed, 1):
                pending.append((following, submit(following)))
            yield item, result
    finally:
        if pending and abandon is not None:
            abandon([handle for _, handle in pending])

"""Read ahead inside an actor: the next micro-batch is read and decoded while this one runs.

On a GPU actor the models wait for the CPU work around them (tar reads, JPEG decoding, RLE
parsing); a producer thread with a bounded queue overlaps that work with the model calls of the
current micro-batch. The queue holds at most ``depth`` batches, so memory stays bounded by the
micro-batch; order is preserved, so outputs are byte-identical with or without it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Generator, Iterator
from typing import TypeVar

T = TypeVar("T")

_DONE = object()


class _Failure:
    def __init__(self, exc: BaseException) -> None:
        self.exc = exc


def prefetched(items: Iterator[T], depth: int) -> Generator[T, None, None]:
    """Yield ``items`` in order, produced up to ``depth`` ahead by a thread (0: in line).

    An exception raised by the producer is re-raised here, at the item where it happened. When the
    consumer stops early (an error in a stage), the producer is told to stop and is joined, so no
    thread outlives the unit and the source stream it holds is closed.
    """
    if depth <= 0:
        yield from items
        return
    slots: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(value: object) -> bool:
        while not stop.is_set():
            try:
                slots.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    break
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer, which re-raises it
            put(_Failure(exc))
            return
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        put(_DONE)

    thread = threading.Thread(target=produce, name="grand-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            value = slots.get()
            if value is _DONE:
                return
            if isinstance(value, _Failure):
                raise value.exc
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        thread.join()

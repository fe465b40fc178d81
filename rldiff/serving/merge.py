"""Merges the batches that wait for a busy sampler into its next run.

``@serve.batch`` closes a batch ``batch_wait_timeout_s`` after its first request, whether or not
the previous batch is still running; batches formed during a long sampler run would then queue
behind it and run one by one, each nearly as slow as a full one (a small model's step costs about
the same at 1 or 8 samples). ``RunMerger`` keeps one run at a time and gives it everything that is
waiting, up to ``max_size`` items (counted by ``size``), so load raises the batch size rather than
the queue.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable


class RunMerger:
    """``await submit(items)`` -> ``run(all merged items)`` results for ``items``, in order.

    ``run`` is a blocking function of a list (it runs in a thread, one call at a time) returning
    one result per item.
    """

    def __init__(self, run: Callable[[list], list], max_size: int, size=len):
        self.run, self.max_size, self.size = run, max_size, size
        self.pending: list[tuple[list, asyncio.Future]] = []
        self.busy = False
        self.runs: list[int] = []  # items per run, for tests and metrics (last 1000)

    async def submit(self, items: list) -> list:
        future = asyncio.get_running_loop().create_future()
        self.pending.append((items, future))
        if not self.busy:
            self.busy = True
            asyncio.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self.pending:
                taken, total = [], 0
                while self.pending and (
                    not taken or total + self.size(self.pending[0][0]) <= self.max_size
                ):
                    items, future = self.pending.pop(0)
                    taken.append((items, future))
                    total += self.size(items)
                merged = [item for items, _ in taken for item in items]
                self.runs = [*self.runs[-999:], len(merged)]
                try:
                    results = await asyncio.to_thread(self.run, merged)
                except Exception as err:
                    for _, future in taken:
                        if not future.done():  # a caller may have gone away
                            future.set_exception(err)
                    continue
                start = 0
                for items, future in taken:
                    if not future.done():
                        future.set_result(results[start : start + len(items)])
                    start += len(items)
        finally:
            self.busy = False

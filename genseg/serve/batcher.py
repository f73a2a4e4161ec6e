"""Micro-batching: instances from concurrent requests are run together, up to `max_batch`, in arrival order.

One worker task takes the oldest waiting instance, gathers whatever else is already queued (up to
`max_batch`), runs the model once in a thread, and hands each caller its own result. First come, first
served, so no request can be starved by later ones.
"""

from __future__ import annotations

import asyncio
from typing import Callable

import numpy as np


class MicroBatcher:
    def __init__(self, run_batch: Callable[[np.ndarray], np.ndarray], max_batch: int = 16):
        self.run_batch = run_batch
        self.max_batch = max_batch
        self.queue: asyncio.Queue = asyncio.Queue()
        self.batches_run = 0
        self._worker: asyncio.Task | None = None

    def start(self) -> None:
        self._worker = asyncio.get_running_loop().create_task(self._work())

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()

    async def submit(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Queue preprocessed images (C, S, S) and wait for their probability maps."""
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in images]
        for image, future in zip(images, futures):
            self.queue.put_nowait((image, future))
        return list(await asyncio.gather(*futures))

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            while len(batch) < self.max_batch and not self.queue.empty():
                batch.append(self.queue.get_nowait())
            images = np.stack([image for image, _ in batch])
            try:
                probabilities = await loop.run_in_executor(None, self.run_batch, images)
            except Exception as exc:  # noqa: BLE001 - every waiting caller must hear about it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(exc)
                continue
            self.batches_run += 1
            for (_, future), probs in zip(batch, probabilities):
                if not future.done():
                    future.set_result(probs)

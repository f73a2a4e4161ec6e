"""Generate requests, kept from starving segmentation: one generation runs at a time on its own thread, a
bounded number wait (in the event loop, holding no thread), more are refused with 503 + Retry-After, and a
generation stops at its next denoising step once its client has gone or the server shuts down."""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

from fastapi import HTTPException, Request

DISCONNECT_POLL_S = 0.25
log = logging.getLogger("genseg.serve")


class GenerationCancelled(Exception):
    """Raised inside the sampler's step callback when nobody waits for the result any more."""


class GenerationQueue:
    def __init__(self, max_waiting: int, retry_after_s: int = 10):
        self.max_waiting = max_waiting
        self.retry_after_s = retry_after_s
        self.pending = 0  # running + waiting
        self._turn = asyncio.Lock()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="genseg-generate")

    async def run(self, request: Request, work: Callable[[Callable[[], None]], Any]) -> Any:
        """Run `work(check_cancelled)` when its turn comes; `check_cancelled()` raises GenerationCancelled once
        the client has disconnected or this coroutine was cancelled (shutdown)."""
        if self.pending >= 1 + self.max_waiting:
            raise HTTPException(503, f"{self.pending} generate requests are already running or waiting; retry later",
                                headers={"Retry-After": str(self.retry_after_s)})
        self.pending += 1
        stop = threading.Event()

        def check_cancelled() -> None:
            if stop.is_set():
                raise GenerationCancelled

        watcher = asyncio.get_running_loop().create_task(self._watch(request, stop))
        try:
            async with self._turn:
                if stop.is_set():
                    raise GenerationCancelled
                return await asyncio.get_running_loop().run_in_executor(self._executor, work, check_cancelled)
        except GenerationCancelled:
            log.info("generation cancelled: its client disconnected")
            raise HTTPException(499, "the client closed the connection before the generation finished") from None
        finally:
            stop.set()  # also reached when this coroutine is cancelled: the thread stops at its next step
            watcher.cancel()
            self.pending -= 1

    @staticmethod
    async def _watch(request: Request, stop: threading.Event) -> None:
        while not stop.is_set():
            if await request.is_disconnected():
                stop.set()
                return
            await asyncio.sleep(DISCONNECT_POLL_S)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

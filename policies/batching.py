"""Gathering concurrent requests into batched calls on one worker thread (numpy-free, torch-free).

`RequestBatcher(run_batch, max_batch, max_wait_s)` owns the single inference thread of the policy server.
`submit(item)` returns a `concurrent.futures.Future`; the worker takes the oldest waiting item, then keeps
collecting until it holds `max_batch` items or `max_wait_s` has passed since it took the first, and calls
`run_batch(items) -> results` once. Each result is routed to its own future: an `Exception` in the results
becomes that request's exception only, so one bad request never touches the others. `call(fn)` runs `fn`
alone on the same thread (reset, warm-up), in queue order, so CUDA graphs and compiled code always see one
thread. `enough()` (optional) says how many items are worth waiting for (the server passes its number of
open connections: clients send one request at a time, so a lone client never waits). `max_pending` bounds
the queue: beyond it `submit` refuses at once (the server answers "busy") instead of letting memory and
latency grow without limit.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

_STOP = object()


class ServerBusy(RuntimeError):
    """More requests are waiting than the batcher's `max_pending`."""


class RequestBatcher:
    """One worker thread running `run_batch` on up to `max_batch` items gathered within `max_wait_s`."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int = 16, max_wait_s: float = 0.002,
                 max_pending: int = 1024, name: str = "policy-infer", enough: Callable[[], int] | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if max_wait_s < 0:
            raise ValueError(f"max_wait must be >= 0, got {max_wait_s}")
        if max_pending < 1:
            raise ValueError(f"max_pending must be >= 1, got {max_pending}")
        self.run_batch, self.max_batch, self.max_wait_s = run_batch, int(max_batch), float(max_wait_s)
        self.max_pending, self.enough = int(max_pending), enough
        self.batch_sizes: deque[int] = deque(maxlen=10_000)  # size of each run_batch call, for tests and benchmarks
        self._queue: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._work, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: Any) -> concurrent.futures.Future:
        """Queue one item for a batched `run_batch` call; the future gets its own result or exception."""
        return self._put(("item", item))

    def call(self, fn: Callable[[], Any]) -> concurrent.futures.Future:
        """Run ``fn()`` alone on the worker thread, after what is already queued."""
        return self._put(("call", fn))

    def _put(self, job: tuple) -> concurrent.futures.Future:
        if self._queue.qsize() >= self.max_pending:
            raise ServerBusy(f"{self.max_pending} requests are already waiting; retry later or raise max_pending")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._queue.put((*job, future))
        return future

    def close(self, timeout: float = 10.0) -> None:
        """Stop the worker after the jobs already queued."""
        self._queue.put(_STOP)
        self._thread.join(timeout)

    def _gather(self, first: tuple) -> tuple[list[tuple], Any]:
        """The first item plus those arriving within max_wait_s (up to max_batch); returns (batch, held job)."""
        batch, deadline = [first], time.monotonic() + self.max_wait_s
        worth = self.max_batch if self.enough is None else max(1, min(self.max_batch, self.enough()))
        while len(batch) < self.max_batch:
            left = deadline - time.monotonic() if len(batch) < worth else 0.0  # then take only what is queued
            try:
                job = self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP or job[0] != "item":
                return batch, job  # a call or stop runs after this batch, in order
            batch.append(job)
        return batch, None

    def _work(self) -> None:
        held = None
        while True:
            job, held = (held, None) if held is not None else (self._queue.get(), None)
            if job is _STOP:
                return
            kind, payload, future = job
            if kind == "call":
                self._settle(future, payload)
                continue
            batch, held = self._gather(job)
            live = [(item, fut) for _, item, fut in batch if fut.set_running_or_notify_cancel()]
            if not live:
                continue
            try:
                results = self.run_batch([item for item, _ in live])
                if len(results) != len(live):
                    raise RuntimeError(f"run_batch returned {len(results)} results for {len(live)} requests")
            except BaseException as e:  # noqa: BLE001 - every waiting request learns of the failure
                results = [e] * len(live)
            self.batch_sizes.append(len(live))
            for (_, fut), result in zip(live, results):
                if isinstance(result, BaseException):
                    fut.set_exception(result)
                else:
                    fut.set_result(result)

    @staticmethod
    def _settle(future: concurrent.futures.Future, fn: Callable[[], Any]) -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as e:  # noqa: BLE001 - handed to the caller
            future.set_exception(e)

"""Score a batch of samples concurrently, with a per-sample timeout, never crashing the run.

Every sample gets a Score: a verifier that raises, returns garbage or overruns `timeout_s`
yields reward 0 with the reason in `Score.failure`. Two ways to run sync verifiers:

- isolation="thread" (default): each call on its own daemon thread. The batch returns on
  time, but Python cannot stop a thread, so a hung verifier keeps its thread (and a share of
  the GIL) until it ends by itself; `live_verifier_threads()` counts them. Fine for
  verifiers that do their risky work elsewhere (the code verifier's sandbox has its own
  wall-clock kill) or are known to finish.
- isolation="process": calls run in a pool of worker processes, and a worker that overruns
  is killed and replaced. Use it for verifiers that may hang in pure Python (pathological
  sympy input, third-party judges). The verifier must then be given as a spec (a registered
  name, a `module:attr` path or a from_config list) so workers can build their own copy.

Async verifiers run on the event loop and are cancelled on timeout; one that blocks the loop
without awaiting stalls the batch, which no scheduler can prevent: make such code sync.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import threading
from collections.abc import Sequence
from multiprocessing.connection import Connection
from typing import Any, Literal

from .contract import Sample, Score, call, failed, in_thread, is_async, normalize, score_fn
from .registry import build

Isolation = Literal["thread", "process"]


def live_verifier_threads() -> int:
    """Verifier threads still running (hung ones the scorer gave up on included)."""
    return sum(t.name == "keeprl-verifier" for t in threading.enumerate())


async def score_one(
    verifier: Any, sample: Sample, *, kwargs: dict | None = None, timeout_s: float = 30.0
) -> Score:
    """Score one sample on this process (threads for sync verifiers)."""
    kwargs = kwargs or {}
    try:
        if is_async(verifier):
            pending = call(verifier, sample, kwargs)
        else:
            pending = in_thread(score_fn(verifier), sample, **kwargs)
        result = await asyncio.wait_for(pending, timeout_s)
    except asyncio.TimeoutError:
        return failed(f"timeout: no result within {timeout_s:g}s")
    except Exception as exc:
        return failed(f"raised {type(exc).__name__}: {exc}")
    return normalize(result)


def _worker_main(conn: Connection, spec: Any, kwargs: dict) -> None:
    """Worker process loop: build the verifier once, then score samples until told to stop."""
    try:
        verifier = build(spec)
    except Exception as exc:
        verifier, error = None, f"cannot build verifier {spec!r}: {exc}"
    while True:
        try:
            sample = conn.recv()
        except (EOFError, OSError):
            return
        if sample is None:
            return
        if verifier is None:
            score = failed(error)
        else:
            try:
                score = normalize(asyncio.run(call(verifier, sample, kwargs)))
            except Exception as exc:
                score = failed(f"raised {type(exc).__name__}: {exc}")
        try:
            conn.send(score)
        except Exception as exc:  # e.g. an unpicklable sub-score slipped through
            conn.send(failed(f"result not transferable: {exc}"))


class _Worker:
    def __init__(self, ctx: Any, spec: Any, kwargs: dict):
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main, args=(child, spec, kwargs), daemon=True, name="keeprl-reward"
        )
        self.proc.start()
        child.close()

    async def score(self, sample: Sample) -> Score:
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.conn.fileno()
        loop.add_reader(fd, lambda: ready.done() or ready.set_result(None))
        try:
            self.conn.send(sample)
            await ready
            return self.conn.recv()
        finally:
            loop.remove_reader(fd)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join()
        self.conn.close()

    def stop(self) -> None:
        try:
            self.conn.send(None)
        except OSError:
            pass
        self.proc.join(timeout=2)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()


class Scorer:
    """Scores batches with one verifier (or combination); reuse it across batches.

    `kwargs` are passed to every call. `max_concurrency` bounds samples in flight (and the
    number of worker processes with isolation="process").
    """

    def __init__(
        self,
        verifier: Any,
        *,
        kwargs: dict | None = None,
        timeout_s: float = 30.0,
        max_concurrency: int = 8,
        isolation: Isolation = "thread",
    ):
        if isolation not in ("thread", "process"):
            raise ValueError(f"isolation must be 'thread' or 'process', got {isolation!r}")
        if isolation == "process" and not isinstance(verifier, (str, list, tuple, dict)):
            raise ValueError(
                "isolation='process' needs the verifier as a spec (registered name, "
                "'module:attr' or a from_config list) so worker processes can build it"
            )
        self.spec, self.kwargs = verifier, dict(kwargs or {})
        self.verifier = build(verifier)
        self.timeout_s, self.max_concurrency, self.isolation = timeout_s, max_concurrency, isolation
        self._idle: list[_Worker] = []
        self._ctx = multiprocessing.get_context("spawn")

    async def _score_in_worker(self, sample: Sample) -> Score:
        worker = self._idle.pop() if self._idle else _Worker(self._ctx, self.spec, self.kwargs)
        try:
            score = await asyncio.wait_for(worker.score(sample), self.timeout_s)
        except asyncio.TimeoutError:
            worker.kill()
            return failed(f"timeout: no result within {self.timeout_s:g}s (worker killed)")
        except (EOFError, OSError) as exc:
            worker.kill()
            return failed(f"worker died: {type(exc).__name__}: {exc}")
        self._idle.append(worker)
        return score

    async def score_async(self, samples: Sequence[Sample]) -> list[Score]:
        gate = asyncio.Semaphore(self.max_concurrency)

        async def one(sample: Sample) -> Score:
            async with gate:
                if self.isolation == "process":
                    return await self._score_in_worker(sample)
                return await score_one(
                    self.verifier, sample, kwargs=self.kwargs, timeout_s=self.timeout_s
                )

        return list(await asyncio.gather(*(one(s) for s in samples)))

    def score(self, samples: Sequence[Sample]) -> list[Score]:
        """Blocking form of `score_async` (starts its own event loop)."""
        return asyncio.run(self.score_async(samples))

    def close(self) -> None:
        while self._idle:
            self._idle.pop().stop()

    def __enter__(self) -> Scorer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def score_batch(verifier: Any, samples: Sequence[Sample], **options: Any) -> list[Score]:
    """One-off: score `samples` with `verifier` (see Scorer for the options)."""
    with Scorer(verifier, **options) as scorer:
        return scorer.score(samples)

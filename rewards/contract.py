"""The verifier plug-in contract: what a verifier receives, may return, and how returns are read.

A verifier is a plain callable `fn(sample, **kwargs)` or an object with such a `score`
method, sync or async. It returns:
- a number: the reward;
- a dict with a numeric "reward" and any other numeric entries, which are sub-scores to log;
- None: the verifier does not apply to this sample (a combination skips it).
Anything else (a string, NaN, a dict without "reward", an exception) is a verifier failure:
it becomes reward 0 with the failure recorded, never a crashed run.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Sample:
    """One model response to judge.

    `reference` holds the task's ground-truth fields (e.g. {"answer": "42"} for math);
    `metadata` is free-form (dataset name, task id, ...). Frozen so verifiers cannot alter
    what other verifiers see; the dicts themselves are shared, so treat them as read-only.
    """

    prompt: str
    response: str
    reference: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Score:
    """A normalised verifier result.

    `applied` is False when the verifier returned None; `reward` is then 0.0 and the caller
    decides what "does not apply" means for training. `failure` names why a verifier broke.
    """

    reward: float
    subscores: dict[str, float] = field(default_factory=dict)
    failure: str | None = None
    applied: bool = True


def score_fn(verifier: Any) -> Callable[..., Any]:
    """The callable to invoke for `verifier`: its `score` method, or itself."""
    method = getattr(verifier, "score", None)
    if callable(method) and not inspect.isfunction(verifier):
        return method
    if callable(verifier):
        return verifier
    raise TypeError(f"not a verifier (neither callable nor has a .score method): {verifier!r}")


def is_async(verifier: Any) -> bool:
    fn = score_fn(verifier)
    if inspect.iscoroutinefunction(fn):
        return True
    # An object whose __call__ is async (functions and methods were covered above).
    return not inspect.isroutine(fn) and inspect.iscoroutinefunction(type(fn).__call__)


def _as_number(value: Any) -> float | None:
    # bool is an int subclass; a True/False reward is accepted as 1/0 on purpose.
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def normalize(result: Any) -> Score:
    """Turn whatever a verifier returned into a Score (garbage becomes a recorded failure)."""
    if isinstance(result, Score):
        return result
    if result is None:
        return Score(0.0, applied=False)
    number = _as_number(result)
    if number is not None:
        return Score(number)
    if isinstance(result, dict):
        reward = _as_number(result.get("reward"))
        if reward is None:
            return failed(f"garbage: dict reward is {result.get('reward')!r}, not a finite number")
        subscores = {}
        for key, value in result.items():
            if key == "reward":
                continue
            sub = _as_number(value)
            if sub is None or not isinstance(key, str):
                return failed(f"garbage: sub-score {key!r} is {value!r}, not a finite number")
            subscores[key] = sub
        return Score(reward, subscores)
    return failed(f"garbage: verifier returned {type(result).__name__} {str(result)[:80]!r}")


def failed(reason: str) -> Score:
    return Score(0.0, {}, failure=reason)


async def call(verifier: Any, sample: Sample, kwargs: dict | None = None) -> Any:
    """Call a verifier on the current thread, awaiting it if it is async (no timeout)."""
    out = score_fn(verifier)(sample, **(kwargs or {}))
    if inspect.isawaitable(out):
        out = await out
    return out


async def in_thread(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run a blocking `fn` on a fresh daemon thread and await its result.

    A fresh daemon thread per call (not a pool) so a verifier that never returns holds only
    its own thread: it cannot starve later calls, nor keep the interpreter from exiting.
    Python cannot kill a thread; the scorer's process isolation exists for that case.
    """
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def deliver(ok: bool, value: Any) -> None:
        if future.done():  # timed out and cancelled meanwhile
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(value)

    def target() -> None:
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:  # carried back to the awaiting task
            outcome = (False, exc)
        except BaseException as exc:  # SystemExit & co. must not unwind the event loop
            outcome = (False, RuntimeError(f"verifier raised {type(exc).__name__}: {exc}"))
        try:
            loop.call_soon_threadsafe(deliver, *outcome)
        except RuntimeError:
            pass  # the event loop closed while this call hung; nobody is waiting

    threading.Thread(target=target, daemon=True, name="keeprl-verifier").start()
    result = await future
    if inspect.isawaitable(result):
        result = await result
    return result

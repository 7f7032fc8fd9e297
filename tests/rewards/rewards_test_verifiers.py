"""Verifiers that misbehave on purpose, importable by `module:attr` from scorer worker
processes (the tests put this directory on sys.path)."""

import asyncio
import threading
import time


def constant(sample, value=1.0):
    return value


def by_length(sample):
    return {"reward": min(len(sample.response) / 10, 1.0), "chars": float(len(sample.response))}


def only_math(sample):
    return 1.0 if "answer" in sample.reference else None


def raises(sample):
    raise ValueError("boom")


def sleeps_forever(sample):
    while True:
        time.sleep(1)


def spins_forever(sample):
    while True:
        pass


def returns_string(sample):
    return "1.0"


def returns_nan(sample):
    return float("nan")


def exits(sample):
    raise SystemExit(3)


async def async_half(sample):
    await asyncio.sleep(0)
    return 0.5


async def async_sleeps_forever(sample):
    await asyncio.sleep(3600)


class ScoreObject:
    """An object verifier: anything with a `score` method."""

    def score(self, sample, bonus=0.0):
        return 0.25 + bonus


score_object = ScoreObject()


RELEASE = threading.Event()
BLOCKED: list = []


def blocks_until_released(sample):
    BLOCKED.append(threading.current_thread())
    RELEASE.wait()
    return 1.0


def kills_its_process_on_odd_lengths(sample):
    """Ends the whole process on responses of odd length, as a crashing native extension
    would (os._exit skips everything Python does on the way out); 1.0 on the others."""
    import os

    if len(sample.response) % 2:
        os._exit(1)
    return 1.0

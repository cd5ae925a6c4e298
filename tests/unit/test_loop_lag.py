"""a2bd_loop_lag_seconds: a loop held up shows as lag."""

from __future__ import annotations

import asyncio
import contextlib
import time

from a2bd.daemon import measure_loop_lag
from a2bd.observability import REGISTRY


def lag(sample: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(f"a2bd_loop_lag_seconds_{sample}", labels) or 0.0


async def test_a_blocked_loop_is_observed_as_lag() -> None:
    count, over_25ms = lag("count"), lag("count") - lag("bucket", le="0.025")
    sampler = asyncio.create_task(measure_loop_lag(every_s=0.01))
    try:
        await asyncio.sleep(0)  # the sampler has set its first timer, due in 10 ms
        time.sleep(0.05)  # noqa: ASYNC251 - the point: hold the loop 50 ms, so that timer runs >= 40 ms late
        for _ in range(100):  # bounded: a few samples are taken within milliseconds
            if lag("count") >= count + 2:
                break
            await asyncio.sleep(0.01)
    finally:
        sampler.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sampler
    assert lag("count") >= count + 2
    assert lag("count") - lag("bucket", le="0.025") >= over_25ms + 1  # at least the sample after the block

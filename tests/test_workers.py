"""``server.workers.ProcessPool``: results, errors, time budgets, cancellation and the
worker kept for small jobs, with real worker processes."""

from __future__ import annotations

import asyncio
import operator
import time

import pytest

from server.errors import InvalidRequest
from server.workers import ProcessPool


def _refuse(message: str):
    raise InvalidRequest(message, param="x.y")


def run(coro):
    return asyncio.run(coro)


def test_result_error_and_timeout():
    async def main():
        pool = ProcessPool("t", 1)
        try:
            assert await pool.run(operator.add, 2, 3, timeout=30) == 5
            with pytest.raises(InvalidRequest) as e:  # typed errors cross with their param
                await pool.run(_refuse, "no", timeout=30)
            assert e.value.param == "x.y" and e.value.status == 400
            t0 = time.monotonic()
            with pytest.raises(TimeoutError):
                await pool.run(time.sleep, 30, timeout=1.0)
            assert time.monotonic() - t0 < 10 and pool.killed == 1
            assert await pool.run(operator.mul, 4, 5, timeout=30) == 20  # a fresh worker
        finally:
            pool.close()
    run(main())


def test_cancelled_job_kills_its_worker():
    async def main():
        pool = ProcessPool("t", 1)
        try:
            task = asyncio.ensure_future(pool.run(time.sleep, 30))
            await asyncio.sleep(0.1)
            while pool.busy == 0:  # wait until the worker took it
                await asyncio.sleep(0.05)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert pool.killed == 1 and pool.busy == 0
            assert await pool.run(operator.add, 1, 1, timeout=30) == 2
        finally:
            pool.close()
    run(main())


def test_big_jobs_leave_one_worker_for_small_ones():
    async def main():
        pool = ProcessPool("t", 2)
        try:
            pool.start()
            big = [asyncio.ensure_future(pool.run(time.sleep, 3, big=True)) for _ in range(3)]
            await asyncio.sleep(0.2)
            t0 = time.monotonic()
            assert await pool.run(operator.add, 1, 2, timeout=30) == 3
            small_s = time.monotonic() - t0
            await asyncio.gather(*big)
            return small_s
        finally:
            pool.close()
    # worker start-up may be included; three 3 s sleeps on one worker are not
    assert run(main()) < 2.5


def _stamp(turn: str, i: int) -> tuple[str, int, float]:
    time.sleep(0.05)
    return turn, i, time.monotonic()


def test_queued_jobs_are_taken_in_turns_by_key():
    """Key b queues six jobs, then key a one: with one worker, a's job runs after at most
    one of b's (the turn served longest ago goes first), not after all six."""
    async def main():
        pool = ProcessPool("t", 1)
        try:
            await pool.run(operator.add, 1, 1)  # the worker is up and idle
            blocker = asyncio.ensure_future(pool.run(time.sleep, 0.5, turn="b"))
            while pool.busy == 0:
                await asyncio.sleep(0.01)
            bs = [asyncio.ensure_future(pool.run(_stamp, "b", i, turn="b")) for i in range(6)]
            a = asyncio.ensure_future(pool.run(_stamp, "a", 0, turn="a"))
            done = await asyncio.gather(blocker, *bs, a)
            order = [turn for turn, _, _ in sorted(done[1:], key=lambda x: x[2])]
            assert order.index("a") <= 1, order
        finally:
            pool.close()
    run(main())


def test_a_photo_crosses_the_worker_socket_in_one_write():
    """A worker's socket pair asks for ``SOCKET_BYTES`` buffers (the kernel grants up to
    net.core.wmem_max / rmem_max, and reports twice what it grants), so a decoded photo is
    one write; larger values still cross whole."""
    import socket
    from pathlib import Path
    from server.workers import SOCKET_BYTES

    async def main():
        pool = ProcessPool("t", 1)
        try:
            data = bytes(range(256)) * (12 * 2**20 // 256)  # 12 MB: several writes' worth
            assert await pool.run(bytes, data, timeout=30) == data
            sock = socket.fromfd(pool._workers[0].conn.fileno(), socket.AF_UNIX,
                                 socket.SOCK_STREAM)
            try:
                for opt, cap in ((socket.SO_SNDBUF, "wmem_max"), (socket.SO_RCVBUF, "rmem_max")):
                    limit = int(Path(f"/proc/sys/net/core/{cap}").read_text())
                    assert sock.getsockopt(socket.SOL_SOCKET, opt) >= 2 * min(SOCKET_BYTES, limit)
            finally:
                sock.close()
        finally:
            pool.close()
    run(main())

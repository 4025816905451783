"""A simulated engine instance that spans several ranks: the leader's steps, mirrored by followers.

A tensor- or pipeline-parallel instance runs every step on all of its ranks. The simulator has no
model to shard, so its followers only mirror the leader's schedule: each engine step the leader
sends (step number, step time) to every follower over the instance's MPI communicator, from a
thread of its own so that MPI never blocks the engine's loop. At stop the leader sends None, and
each follower answers with the number of steps it mirrored, which the leader checks: the same
start-up, lifetime and shutdown path a real multi-rank engine needs, testable without one.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import signal
import threading

from slurmserve.runtime.instance_comm import recv

log = logging.getLogger(__name__)

TAG = 7301                 # MPI tag of mirror messages (nothing else uses the instance communicator)
FINAL_COUNT_TIMEOUT_S = 5.0


def _recv(comm, source: int, stop: threading.Event, timeout_s: float | None = None):
    return recv(comm, source, TAG, stop, timeout_s)


class StepMirror:
    """The leader's side: `step()` from the engine loop, `close()` at stop."""

    def __init__(self, comm):
        self.comm = comm
        self.followers = list(range(1, comm.Get_size()))
        self.steps = 0
        self._q: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._send_loop, name="sim-mirror", daemon=True)
        self._thread.start()

    def step(self, step: int, ms: float) -> None:
        self.steps = step
        self._q.put((step, ms))

    def _send_loop(self) -> None:
        while True:
            item = self._q.get()
            batch = [item]
            while item is not None and not self._q.empty():   # what queued meanwhile goes in one message
                item = self._q.get()
                batch.append(item)
            last = batch[-1] is None
            steps = [b for b in batch if b is not None]
            for r in self.followers:
                if steps:
                    self.comm.send(steps, dest=r, tag=TAG)
                if last:
                    self.comm.send(None, dest=r, tag=TAG)
            if last:
                return

    def close(self) -> dict[int, int | None]:
        """Stop the followers; the steps each says it mirrored (None: no answer)."""
        self._q.put(None)
        self._thread.join()
        stop = threading.Event()
        counts = {r: _recv(self.comm, r, stop, FINAL_COUNT_TIMEOUT_S) for r in self.followers}
        for r, n in counts.items():
            if n != self.steps:
                log.warning("follower rank %d of the instance mirrored %s steps, the leader ran %d", r, n, self.steps)
        log.info("instance followers mirrored %s steps (leader: %d)", sorted(set(counts.values()), key=str),
                 self.steps)
        return counts


async def follow(comm) -> int:
    """A follower rank: mirror the leader's steps until it stops us (0) or a signal does (1)."""
    stop = threading.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info("following instance leader (instance rank %d of %d)", comm.Get_rank(), comm.Get_size())
    steps = 0
    while True:
        batch = await asyncio.to_thread(_recv, comm, 0, stop)
        if batch is None:
            break
        steps = batch[-1][0]
    if stop.is_set():
        log.warning("follower stopped by a signal after %d steps", steps)
        return 1
    comm.send(steps, dest=0, tag=TAG)
    log.info("the leader stopped the instance: mirrored %d steps", steps)
    return 0

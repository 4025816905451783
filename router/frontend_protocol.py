"""Messages between a multi-process head's HTTP front ends and its router process (msgpack over a
ZeroMQ IPC socket in a private directory; router/frontend_hub.py and router/remote_orchestrator.py).

A front end sends what HeadApp asks of an Orchestrator: start a prepared request (token ids and
sampling params: tokenizing stayed in the front end), release one. The router answers with one
`Batch` per turn of its loop: the requests it started or refused, and every delta that turn
brought for that front end's requests, so one engine step costs a front end one message however
many of its requests it advanced.
"""

from __future__ import annotations

import msgspec

from slurmserve.router.metrics import RequestSnapshot
from slurmserve.runtime import protocol as P


class _Msg(msgspec.Struct, array_like=True, tag=True, gc=False):
    pass


# ---- front end -> router ------------------------------------------------------------------------

class Hello(_Msg):
    """The front end listens (on the head's port, with SO_REUSEPORT) and can take requests."""
    index: int
    pid: int


class Start(_Msg):
    rid: str
    prompt: list[int]
    params: P.SamplingParams
    session: bytes | None
    interval: int


class Release(_Msg):
    """The client is gone before the request ended: abort it. (A request that ended is released
    by the router itself, with no message.)"""
    rid: str


class Scrape(_Msg):
    """GET /metrics reached this front end: the router answers with every process's metrics."""
    token: int


class Snapshot(_Msg):
    """This front end's request metrics, for a Gather."""
    token: int
    metrics: RequestSnapshot


class Drained(_Msg):
    """After a Drain: requests still running when the grace ended, cut."""
    cut: int


# ---- router -> front end ------------------------------------------------------------------------

class Batch(_Msg):
    started: list[str] = []
    refused: list[tuple[str, int, str]] = []     # rid, HTTP status, message
    deltas: list[tuple[str, P.Delta]] = []


class Fleet(_Msg):
    """What the front ends' /health and request checks need to know of the engines (sent when it changes)."""
    ready: bool
    kinds: list[str]


class Gather(_Msg):
    token: int


class Scraped(_Msg):
    token: int
    text: bytes


class Drain(_Msg):
    """Refuse new requests; let running ones finish within `grace_s`; answer Drained."""
    grace_s: float


class Stop(_Msg):
    pass


ToRouter = Hello | Start | Release | Scrape | Snapshot | Drained
ToFrontend = Batch | Fleet | Gather | Scraped | Drain | Stop

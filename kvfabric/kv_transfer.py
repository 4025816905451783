"""Moves KV blocks between engine instances: NIXL (UCX) one-sided READs, or ZeroMQ without nixl.

Each instance owns one `KVTransfer`: a buffer of `num_blocks` KV blocks of `block_bytes` each
(`buffer`, indexed by block id: a numpy array in host memory, or with `device="cuda:N"` a torch
tensor on that GPU, see kv_buffer.py), registered with NIXL when nixl is importable, and a side
channel: a CURVE-protected ZeroMQ ROUTER bound on the runtime-assigned `kv_side_channel_port`.
The side channel's public key travels only inside the job (MPI bootstrap endpoints), so another
user of the cluster who finds the port cannot complete a handshake, read the NIXL metadata (which
holds the buffer's remote keys) or, over ZeroMQ, the KV bytes.

Prefill side: `export(tag, block_ids, num_tokens, on_done)` returns the `kv_transfer_params` that
tell a decode instance where the blocks live, and remembers the export until the reader says it is
done (NIXL: the notification the READ carries; ZeroMQ: the read request itself), then calls
`on_done(True)`; an export nobody reads expires after `export_timeout_s` (`on_done(False)`), so
the engine can release its blocks.

Decode side: `import_(params, local_block_ids)` pulls the blocks into local blocks and returns
when the bytes are there; `import_async` does the same on a background thread and returns a
concurrent Future. The first use of a peer fetches its metadata over the side channel and adds its
NIXL agent; a peer that dies mid-transfer (or stops answering until the deadline) raises
`KVTransferError`, its agent is dropped, and the next use adds it again (a restarted peer has a new
`remote_session`, which also forces a fresh handshake).

Progress: the NIXL agent runs without NIXL's progress thread
(it busy-spins) in the thread-safe RW sync mode. A service thread answers the side channel and
calls `get_new_notifs()`. Over UCX's default transports a READ completes only when the exporting
side progresses too, so while exports are outstanding the thread polls about every `busy_poll_s`
for `fast_window_s` after the latest export or notification (a reader usually comes within
milliseconds), then every `pending_poll_s` (about 23% of a core at the fast rate on the 2-core
test box, ~1% at the slow one); with no export outstanding it wakes every `idle_poll_s`. The
initiator waits for its transfer by polling its state (which is also what drives UCX on its side),
tightly for at most `spin_s`, then in naps growing to `max_nap_s`.

`create_kv_transfer(backend, ...)` is the one place a backend is chosen: "nixl", "zmq", or "auto"
(NIXL when `nixl` imports, else ZeroMQ).
"""

from __future__ import annotations

import concurrent.futures as cf
import importlib.util
import logging
import os
import re
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import zmq

from slurmserve.kvfabric import kv_buffer
from slurmserve.kvfabric.ucx_env import ucx_env_defaults

log = logging.getLogger(__name__)


class KVTransferError(RuntimeError):
    """A KV pull that did not deliver the bytes: peer gone, refused, timed out or misdescribed."""


# ---- the transfer object ------------------------------------------------------------------------

_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder()


class _Export:
    __slots__ = ("deadline", "on_done")

    def __init__(self, deadline: float, on_done: Callable[[bool], None] | None):
        self.deadline = deadline
        self.on_done = on_done


class _Peer:
    """A remote instance this one has handshaken with."""

    __slots__ = ("key", "session", "name", "num_blocks", "handle")

    def __init__(self, key: tuple[str, int], info: dict):
        self.key = key
        self.session = info["session"]
        self.name = info["name"]
        self.num_blocks = info["num_blocks"]
        self.handle: Any = None       # backend state (NIXL: agent name and prepared dlist)


class KVTransfer:
    """One instance's KV buffer, side channel and transfers; subclasses move the bytes."""

    backend = "base"
    needs_passive_progress = False    # does the exporting side have to poll for reads to complete?

    def __init__(self, name: str, host: str, port: int, num_blocks: int, block_bytes: int,
                 curve_keys: tuple[bytes | str, bytes | str], peer_keys: dict[str, bytes | str],
                 *, export_timeout_s: float = 30.0, handshake_timeout_s: float = 2.0,
                 import_timeout_s: float = 10.0, idle_poll_s: float = 0.05, busy_poll_s: float = 50e-6,
                 spin_s: float = 2e-3, max_nap_s: float = 200e-6, fast_window_s: float = 0.05,
                 pending_poll_s: float = 1e-3, device: str = "cpu"):
        """`curve_keys`: this side channel's CURVE (public, secret) pair. `peer_keys`: "host:port"
        of every side channel this instance may pull from -> its public key; a peer not in it is
        refused. `port` 0 binds a free port (tests). `device`: where the blocks live, "cpu" or
        "cuda:N"; a peer's blocks may live elsewhere (host to GPU pulls work)."""
        if block_bytes <= 0 or block_bytes % 8:
            raise ValueError(f"block_bytes must be a positive multiple of 8, got {block_bytes}")
        self.name = name
        self.host = host
        self.num_blocks = num_blocks
        self.block_bytes = block_bytes
        self.session = os.urandom(8).hex()
        self.export_timeout_s = export_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self.import_timeout_s = import_timeout_s
        self.idle_poll_s = idle_poll_s
        self.busy_poll_s = busy_poll_s
        self.spin_s = spin_s
        self.max_nap_s = max_nap_s
        self.fast_window_s = fast_window_s
        self.pending_poll_s = pending_poll_s
        self._public, self._secret = (k.encode() if isinstance(k, str) else k for k in curve_keys)
        self._peer_keys = {a: (k.encode() if isinstance(k, str) else k) for a, k in peer_keys.items()}
        self.placement = kv_buffer.placement(device)
        self.buffer = kv_buffer.allocate(num_blocks, block_bytes, self.placement)
        self.stats = {"exports": 0, "exports_done": 0, "exports_expired": 0, "imports": 0,
                      "import_failures": 0, "bytes_in": 0, "handshakes": 0, "peers_dropped": 0}
        self._lock = threading.Lock()
        self._exports: dict[bytes, _Export] = {}
        self._peers: dict[tuple[str, int], _Peer] = {}
        self._local = threading.local()       # per thread: DEALER sockets to peers' side channels
        self._client_socks: list[zmq.Socket] = []
        self._importer: cf.ThreadPoolExecutor | None = None
        self.in_flight = 0                    # transfers posted and not finished (tests watch it)
        self._closed = False

        self._setup_backend()
        self._zctx = zmq.Context(io_threads=1)
        self._server = self._zctx.socket(zmq.ROUTER)
        self._server.curve_server = True
        self._server.curve_publickey, self._server.curve_secretkey = self._public, self._secret
        self._server.setsockopt(zmq.LINGER, 0)
        try:
            if port:
                self._server.bind(f"tcp://{host}:{port}")
                self.port = port
            else:
                self.port = self._server.bind_to_random_port(f"tcp://{host}")
        except zmq.ZMQError:
            self._server.close(linger=0)
            self._zctx.term()
            self._close_backend()
            raise
        wake = f"inproc://kv-transfer-wake-{id(self)}"
        self._wake_r = self._zctx.socket(zmq.PAIR)
        self._wake_r.bind(wake)
        self._wake_w = self._zctx.socket(zmq.PAIR)
        self._wake_w.connect(wake)
        self._wake_lock = threading.Lock()
        self._thread = threading.Thread(target=self._serve, name=f"kv-transfer-{name}", daemon=True)
        self._thread.start()

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def public_key(self) -> bytes:
        return self._public

    # ---- prefill side ---------------------------------------------------------------------------

    def export(self, tag: str, block_ids: list[int], num_tokens: int,
               on_done: Callable[[bool], None] | None = None) -> dict[str, Any]:
        """kv_transfer_params for a decode instance; `on_done(read)` runs on the service thread
        once the reader is done (True) or the export expired (False)."""
        with self._lock:
            self._exports[tag.encode()] = _Export(time.monotonic() + self.export_timeout_s, on_done)
            self.stats["exports"] += 1
        self._poke()
        return {"remote_engine_id": self.name, "remote_request_id": tag, "remote_host": self.host,
                "remote_port": self.port, "remote_session": self.session,
                "remote_block_ids": list(block_ids), "num_tokens": num_tokens,
                "kv_backend": self.backend, "block_bytes": self.block_bytes}

    def pending_exports(self) -> int:
        with self._lock:
            return len(self._exports)

    def _export_done(self, tag: bytes, read: bool) -> None:
        with self._lock:
            ex = self._exports.pop(tag, None)
            if ex is None:
                return
            self.stats["exports_done" if read else "exports_expired"] += 1
        if ex.on_done is not None:
            try:
                ex.on_done(read)
            except Exception:
                log.exception("KV export callback for %s failed", tag)

    # ---- decode side ----------------------------------------------------------------------------

    def import_(self, params: dict[str, Any], local_block_ids: list[int],
                remote_block_ids: list[int] | None = None, timeout_s: float | None = None) -> int:
        """Pull remote blocks (default: all of params["remote_block_ids"]) into local blocks;
        returns the bytes moved. Raises KVTransferError; the peer is then dropped."""
        deadline = time.monotonic() + (self.import_timeout_s if timeout_s is None else timeout_s)
        remote = np.asarray(params["remote_block_ids"] if remote_block_ids is None else remote_block_ids,
                            dtype=np.int32)
        local = np.asarray(local_block_ids, dtype=np.int32)
        tag = str(params.get("remote_request_id", "")).encode()
        if remote.shape != local.shape or local.ndim != 1:
            raise KVTransferError(f"{remote.size} remote blocks for {local.size} local ones")
        if params.get("block_bytes", self.block_bytes) != self.block_bytes:
            raise KVTransferError(f"peer blocks are {params['block_bytes']} bytes, ours {self.block_bytes}")
        peer = self._peer(params, deadline)
        try:
            if not remote.size:     # nothing to move (the decode side had it cached): just release
                self._request(peer.key, [b"DONE", tag], deadline)
                return 0
            with self._lock:
                self.in_flight += 1
            try:
                self._read(peer, remote, local, tag, deadline)
            finally:
                with self._lock:
                    self.in_flight -= 1
        except KVTransferError:
            self._drop(peer)
            with self._lock:
                self.stats["import_failures"] += 1
            raise
        n = len(local) * self.block_bytes
        with self._lock:
            self.stats["imports"] += 1
            self.stats["bytes_in"] += n
        return n

    def import_async(self, params: dict[str, Any], local_block_ids: list[int],
                     remote_block_ids: list[int] | None = None, timeout_s: float | None = None) -> cf.Future:
        """import_ on this instance's importer thread; the Future holds its result or error."""
        if self._importer is None:
            self._importer = cf.ThreadPoolExecutor(1, thread_name_prefix=f"kv-import-{self.name}",
                                                   initializer=kv_buffer.bind_thread, initargs=(self.placement,))
        return self._importer.submit(self.import_, params, local_block_ids, remote_block_ids, timeout_s)

    def _peer(self, params: dict[str, Any], deadline: float) -> _Peer:
        key = (str(params["remote_host"]), int(params["remote_port"]))
        with self._lock:
            peer = self._peers.get(key)
        if peer is not None and peer.session == params.get("remote_session", peer.session):
            return peer
        if peer is not None:          # the peer restarted: its old agent and metadata are stale
            self._drop(peer)
        reply = self._request(key, [b"MD"], deadline)
        try:
            info = _dec.decode(reply[1])
        except (IndexError, msgspec.DecodeError) as e:
            raise KVTransferError(f"bad handshake from {key[0]}:{key[1]}: {e}") from None
        if info.get("block_bytes") != self.block_bytes:
            raise KVTransferError(f"peer {info.get('name')} has {info.get('block_bytes')}-byte blocks, "
                                  f"this instance {self.block_bytes}")
        peer = _Peer(key, info)
        try:
            self._connect(peer, info)
        except KVTransferError:
            raise
        except Exception as e:
            raise KVTransferError(f"cannot add peer {peer.name}: {e}") from None
        with self._lock:
            self._peers[key] = peer
            self.stats["handshakes"] += 1
        return peer

    def _drop(self, peer: _Peer) -> None:
        with self._lock:
            if self._peers.get(peer.key) is peer:
                del self._peers[peer.key]
            self.stats["peers_dropped"] += 1
        self._close_client(peer.key)
        try:
            self._disconnect(peer)
        except Exception:
            log.debug("dropping peer %s", peer.name, exc_info=True)

    def metadata(self) -> dict[str, Any]:
        """What the side channel's handshake tells a reader: this instance and, for NIXL, its
        agent's metadata and where its blocks live."""
        return {"name": self.name, "session": self.session, "num_blocks": self.num_blocks,
                "block_bytes": self.block_bytes, **self._describe()}

    # ---- side channel: client -------------------------------------------------------------------

    def _client(self, key: tuple[str, int]) -> zmq.Socket:
        socks = getattr(self._local, "socks", None)
        if socks is None:
            socks = self._local.socks = {}
        sock = socks.get(key)
        if sock is None:
            server_key = self._peer_keys.get(f"{key[0]}:{key[1]}")
            if server_key is None:
                raise KVTransferError(f"{key[0]}:{key[1]} is not a KV side channel of this job")
            sock = self._zctx.socket(zmq.DEALER)
            sock.curve_serverkey = server_key
            sock.curve_publickey, sock.curve_secretkey = self._public, self._secret
            sock.setsockopt(zmq.LINGER, 0)
            sock.connect(f"tcp://{key[0]}:{key[1]}")
            socks[key] = sock
            with self._lock:
                self._client_socks.append(sock)
        return sock

    def _close_client(self, key: tuple[str, int]) -> None:
        socks = getattr(self._local, "socks", None)
        sock = socks.pop(key, None) if socks else None
        if sock is not None:
            with self._lock:
                if sock in self._client_socks:
                    self._client_socks.remove(sock)
            sock.close(linger=0)

    def _request(self, key: tuple[str, int], frames: list, deadline: float) -> list[bytes]:
        """One request/reply on the side channel; a silent or refusing peer raises KVTransferError."""
        sock = self._client(key)
        sock.send_multipart(frames, copy=False)
        wait_ms = max(0, int((min(deadline, time.monotonic() + self.handshake_timeout_s) - time.monotonic()) * 1000))
        if not sock.poll(wait_ms):
            self._close_client(key)    # a late reply must not answer the next request
            raise KVTransferError(f"no answer from the KV side channel at {key[0]}:{key[1]} "
                                  f"(peer gone, or the job's key does not match)")
        reply = sock.recv_multipart(copy=False)
        if reply[0].bytes == b"ERR":
            raise KVTransferError(f"peer at {key[0]}:{key[1]} refused: {reply[1].bytes.decode()}")
        return [f.buffer if i >= 2 else f.bytes for i, f in enumerate(reply)]

    # ---- side channel: server thread ------------------------------------------------------------

    def _poke(self) -> None:
        with self._wake_lock:
            if not self._closed:
                self._wake_w.send(b"", zmq.NOBLOCK)

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._server, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        idle_ms = max(1, int(self.idle_poll_s * 1000))
        pending_ms = max(1, int(self.pending_poll_s * 1000))
        next_expiry = time.monotonic() + 1.0
        fast_until = 0.0
        kv_buffer.bind_thread(self.placement)     # UCX's CUDA calls for a GPU buffer run here too
        try:
            while True:
                busy = self.needs_passive_progress and bool(self._exports)
                fast = busy and time.monotonic() < fast_until
                events = dict(poller.poll(0 if fast else pending_ms if busy else idle_ms))
                if self._wake_r in events:
                    while self._wake_r.poll(0):
                        if self._wake_r.recv() == b"stop":
                            return
                    fast_until = time.monotonic() + self.fast_window_s      # a new export
                if self._server in events:
                    while self._server.poll(0):
                        self._handle(self._server.recv_multipart(copy=False))
                notified = self._progress()
                for tag in notified:
                    self._export_done(tag, True)
                now = time.monotonic()
                if notified:
                    fast_until = now + self.fast_window_s
                if now >= next_expiry:
                    next_expiry = now + 1.0
                    with self._lock:
                        expired = [t for t, ex in self._exports.items() if ex.deadline <= now]
                    for tag in expired:
                        log.warning("KV export %s was never read; released", tag.decode(errors="replace"))
                        self._export_done(tag, False)
                if fast and not events:
                    time.sleep(self.busy_poll_s)
        except zmq.ContextTerminated:
            pass
        except Exception:
            log.exception("KV transfer service thread failed")

    def _handle(self, frames: list) -> None:
        ident, op = frames[0], frames[1].bytes if len(frames) > 1 else b""
        try:
            if op == b"MD":
                reply = [b"MD", _enc.encode(self.metadata())]
            elif op == b"DONE" and len(frames) == 3:
                self._export_done(frames[2].bytes, True)
                reply = [b"OK"]
            else:
                reply = self._serve_op(op, frames[2:])
        except Exception as e:      # a malformed request from a job member: answer, keep serving
            reply = [b"ERR", str(e).encode()]
        self._server.send_multipart([ident, *reply], copy=False)

    # ---- backend hooks --------------------------------------------------------------------------

    def _setup_backend(self) -> None:
        pass

    def _close_backend(self) -> None:
        pass

    def _describe(self) -> dict:
        return {}

    def _connect(self, peer: _Peer, info: dict) -> None:
        pass

    def _disconnect(self, peer: _Peer) -> None:
        pass

    def _read(self, peer: _Peer, remote: np.ndarray, local: np.ndarray, tag: bytes, deadline: float) -> None:
        raise NotImplementedError

    def _serve_op(self, op: bytes, args: list) -> list:
        raise ValueError(f"unknown side-channel request {op!r}")

    def _progress(self) -> list[bytes]:
        return []

    # ---- shutdown -------------------------------------------------------------------------------

    def close(self) -> None:
        if self._closed:
            return
        if self._importer is not None:
            self._importer.shutdown(wait=True, cancel_futures=True)
        with self._wake_lock:
            self._wake_w.send(b"stop")
            self._closed = True
        self._thread.join(timeout=5)
        with self._lock:
            socks, self._client_socks = self._client_socks, []
        for s in (*socks, self._server, self._wake_r, self._wake_w):
            s.close(linger=0)
        self._zctx.term()
        self._close_backend()

    def __enter__(self) -> KVTransfer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class ZmqKVTransfer(KVTransfer):
    """The bytes travel over the side channel itself: READ request, one reply frame of blocks."""

    backend = "zmq"

    def _read(self, peer: _Peer, remote: np.ndarray, local: np.ndarray, tag: bytes, deadline: float) -> None:
        if local.min() < 0 or local.max() >= self.num_blocks:     # (NIXL checks its indices itself)
            raise KVTransferError("local block id out of range")
        reply = self._request(peer.key, [b"READ", tag, _enc.encode(remote.tolist())], deadline)
        data = np.frombuffer(reply[2], dtype=np.uint8) if len(reply) > 2 else np.empty(0, np.uint8)
        if data.size != len(local) * self.block_bytes:
            raise KVTransferError(f"peer {peer.name} sent {data.size} bytes for {len(local)} blocks")
        kv_buffer.scatter(self.buffer, local, data.reshape(len(local), self.block_bytes))

    def _serve_op(self, op: bytes, args: list) -> list:
        if op != b"READ" or len(args) != 2:
            return super()._serve_op(op, args)
        tag, ids = args[0].bytes, _dec.decode(args[1].bytes)
        if any(not isinstance(b, int) or not 0 <= b < self.num_blocks for b in ids):
            raise ValueError("block id out of range")
        data = kv_buffer.gather(self.buffer, ids)      # one frame, no further copy
        self._export_done(tag, True)                   # the read is the notification
        return [b"DATA", tag, data]


class NixlKVTransfer(KVTransfer):
    """NIXL agent with the UCX backend over `buffer`; decode READs blocks, the READ notifies."""

    backend = "nixl"
    needs_passive_progress = True

    def _setup_backend(self) -> None:
        for k, v in {**ucx_env_defaults(), "UCX_WARN_UNUSED_ENV_VARS": "n"}.items():
            os.environ.setdefault(k, v)     # before the agent: UCX reads them when it starts
        api = import_nixl_api()
        cfg = api.nixl_agent_config(enable_prog_thread=False, enable_listen_thread=False, backends=[],
                                    sync_mode=api.nixl_thread_sync_t.NIXL_THREAD_SYNC_RW)
        self.agent = api.nixl_agent(self.name, cfg)
        self.agent.create_backend("UCX", {})
        where = self.placement
        self._base = kv_buffer.address(self.buffer)
        self._reg = self.agent.register_memory([(self._base, self.buffer.nbytes, where.dev_id, "")], where.mem_type)
        self._dlist = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", self._descs(self._base, self.num_blocks, where.dev_id), where.mem_type)

    def _descs(self, base: int, n: int, dev_id: int) -> np.ndarray:
        d = np.zeros((n, 3), dtype=np.uint64)
        d[:, 0] = base + np.arange(n, dtype=np.uint64) * np.uint64(self.block_bytes)
        d[:, 1] = self.block_bytes
        d[:, 2] = dev_id
        return d

    def _describe(self) -> dict:
        where = self.placement
        return {"md": self.agent.get_agent_metadata(), "base": self._base, "mem": where.mem_type,
                "dev": where.dev_id}

    def _connect(self, peer: _Peer, info: dict) -> None:
        mem = info.get("mem", "DRAM")
        if mem not in ("DRAM", "VRAM"):
            raise KVTransferError(f"peer {peer.name} has blocks in unknown memory {mem!r}")
        name = self.agent.add_remote_agent(info["md"])
        try:
            descs = self._descs(int(info["base"]), peer.num_blocks, int(info.get("dev", 0)))
            dlist = self.agent.prep_xfer_dlist(name, descs, mem)
        except Exception:
            self.agent.remove_remote_agent(name)
            raise
        peer.handle = (name, dlist)

    def _disconnect(self, peer: _Peer) -> None:
        if peer.handle is None:
            return
        name, dlist = peer.handle
        peer.handle = None
        try:
            self.agent.release_dlist_handle(dlist)
        finally:
            self.agent.remove_remote_agent(name)

    def _read(self, peer: _Peer, remote: np.ndarray, local: np.ndarray, tag: bytes, deadline: float) -> None:
        agent = self.agent
        _, rdlist = peer.handle
        handle = None
        try:
            handle = agent.make_prepped_xfer("READ", self._dlist, local, rdlist, remote, tag)
            state = agent.transfer(handle)
            # Polling the state is what drives UCX (over TCP the reader pumps the data), so poll
            # tightly for a while (reading the clock only every 32 polls), then in short naps: a
            # waiting reader must not hold a core.
            check = agent.check_xfer_state
            spin_until = time.monotonic() + self.spin_s
            while state == "PROC" and time.monotonic() < spin_until:
                for _ in range(32):
                    state = check(handle)
                    if state != "PROC":
                        break
            nap = 20e-6
            while state == "PROC":
                if time.monotonic() > deadline:
                    raise KVTransferError(f"READ from {peer.name} did not finish in time")
                time.sleep(nap)
                nap = min(nap * 2, self.max_nap_s)
                state = check(handle)
            if state != "DONE":
                raise KVTransferError(f"READ from {peer.name} failed ({state})")
        except KVTransferError:
            raise
        except Exception as e:          # nixlRemoteDisconnectError and friends
            raise KVTransferError(f"READ from {peer.name} failed: {type(e).__name__}: {e}") from None
        finally:
            if handle is not None:
                try:
                    agent.release_xfer_handle(handle)
                except Exception:
                    log.debug("releasing a failed transfer handle", exc_info=True)

    def _progress(self) -> list[bytes]:
        return [m for msgs in self.agent.get_new_notifs().values() for m in msgs]

    def _close_backend(self) -> None:
        agent = getattr(self, "agent", None)
        if agent is None:
            return
        for peer in list(self._peers.values()):
            try:
                self._disconnect(peer)
            except Exception:
                pass
        try:
            agent.release_dlist_handle(self._dlist)
            agent.deregister_memory(self._reg)
        except Exception:
            log.debug("NIXL teardown", exc_info=True)
        self.agent = None


def _torch_without_cuda() -> bool:
    """True when torch is installed, not imported, and a build without CUDA (read off disk)."""
    if "torch" in sys.modules:
        return False
    spec = importlib.util.find_spec("torch")
    if spec is None or not spec.origin:
        return False
    try:
        text = (Path(spec.origin).parent / "version.py").read_text()
    except OSError:
        return False
    return re.search(r"^cuda\b[^=\n]*=\s*None\s*$", text, re.M) is not None


def import_nixl_api():
    """nixl._api, imported without torch where torch has no CUDA.

    nixl's meta package picks its CUDA build from torch (nixl_meta_utils.detect_cuda_major): it reads
    a CUDA torch's version off disk, but imports a torch without CUDA only to learn that it has none,
    which costs a second or more of start-up and triton's ~40 nanobind "leaked" lines at exit. Only
    that import is refused here; a GPU buffer has imported its CUDA torch already (kv_buffer)."""
    if not _torch_without_cuda():
        import nixl._api
        return nixl._api
    sys.modules["torch"] = None          # `import torch` raises ImportError while nixl loads
    try:
        import nixl._api
    finally:
        if "torch" in sys.modules and sys.modules["torch"] is None:
            del sys.modules["torch"]
    return nixl._api


def nixl_available() -> bool:
    try:
        import_nixl_api()
    except ImportError:
        return False
    return True


def create_kv_transfer(backend: str = "auto", **kw) -> KVTransfer:
    """The one place a backend is picked: "nixl", "zmq", or "auto" (NIXL when importable)."""
    if backend == "auto":
        backend = "nixl" if nixl_available() else "zmq"
    if backend == "nixl":
        return NixlKVTransfer(**kw)
    if backend == "zmq":
        return ZmqKVTransfer(**kw)
    raise ValueError(f"unknown KV transfer backend {backend!r}")

"""Start-up and shutdown of `pbnds serve`: model, socket, discovery file, uvicorn."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
import time
from pathlib import Path

import h11
import torch
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from .. import __version__
from ..jobformat import Options
from ..renderer import Renderer
from . import logs
from .app import create_app
from .jobs import JobManager
from .security import is_loopback_host, remove_discovery_file, service_file_path, write_discovery_file

HEADER_TIMEOUT = 10.0  # s from the connection (or the previous response) to a complete request header
BODY_IDLE_TIMEOUT = 30.0  # s without a byte while a request body is being received
KEEP_ALIVE_TIMEOUT = 5.0  # s an idle keep-alive connection is kept


class DropLog:
    """Counts connections the service drops and logs them at most once per `interval` seconds, so a flood
    of idle or half-sent connections cannot flood the log."""

    def __init__(self, interval: float = 10.0):
        self.interval, self.counts, self.last = interval, {}, 0.0

    def count(self, reason: str) -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self.last >= self.interval:
            logs.event("connections.dropped", **self.counts)
            self.counts, self.last = {}, now


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with the limits it lacks: a header timeout (uvicorn waits forever for the
    first request of a connection and for the rest of a half-sent header), a body idle timeout, and a cap
    on open connections that evicts the oldest one without a request in progress.

    uvicorn's own `limit_concurrency` is not used: it answers 503 to every new request once idle
    connections fill it, which is what an attacker holding half-open connections wants.
    """

    max_connections = 256
    drops = DropLog()

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.opened = time.monotonic()
        self.read_timer = None
        self._arm(HEADER_TIMEOUT, "header_timeout")
        if len(self.connections) > self.max_connections:
            idle = [c for c in self.connections  # a closing one stays listed until its connection_lost
                    if c is not self and not c.transport.is_closing() and c._waiting_for_header()]
            victim = min(idle, key=lambda c: c.opened) if idle else self
            victim._drop("evicted")

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is h11.SEND_BODY:
            self._arm(BODY_IDLE_TIMEOUT, "body_timeout")
        elif self._waiting_for_header():
            if self.read_timer is None:  # a slow header gets no more time for each byte it sends
                self._arm(HEADER_TIMEOUT, "header_timeout")
        else:
            self._disarm()

    def _waiting_for_header(self) -> bool:
        return self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)

    def _arm(self, seconds: float, reason: str) -> None:
        self._disarm()
        self.read_timer = self.loop.call_later(seconds, self._drop, reason)

    def _disarm(self) -> None:
        if self.read_timer is not None:
            self.read_timer.cancel()
            self.read_timer = None

    def _drop(self, reason: str) -> None:
        self._disarm()
        if not self.transport.is_closing():
            self.drops.count(reason)
            self.transport.close()


class AdvertisedServer(uvicorn.Server):
    """Writes the discovery file once it is listening and removes it as soon as it begins to stop.

    uvicorn turns SIGINT/SIGTERM into a graceful shutdown: stop accepting, finish open requests,
    then the app's lifespan end, which cancels the running job and stops the worker.
    """

    def __init__(self, config: uvicorn.Config, path: Path, info: dict):
        super().__init__(config)
        self.path, self.info = path, info

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            write_discovery_file(self.path, self.info)
            logs.event("service.started", url=self.info["url"], pid=self.info["pid"], service_file=str(self.path))

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        remove_discovery_file(self.path, self.info["token"])
        logs.event("service.stopping")
        await super().shutdown(sockets)
        logs.event("service.stopped")


def bind(host: str, port: int) -> socket.socket:
    # IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and without it
    # every keep-alive request waited ~40 ms (Nagle against the client's delayed ACK)
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    return sock


def serve(args: argparse.Namespace) -> int:
    if not is_loopback_host(args.host) and not args.allow_remote:
        raise ValueError(f"--host {args.host} is reachable from other machines; pass --allow-remote to "
                         "serve it anyway (the token is still required; traffic is not encrypted)")
    for name in ("port", "queue_size", "max_upload_mb", "keep_jobs", "keep_gbuffers", "max_pixels", "max_connections"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'non-negative' if name == 'port' else 'positive'}")
    if args.threads is not None and args.threads < 1:
        raise ValueError("--threads must be positive")
    logs.setup()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    renderer = Renderer(args.device, Options(model=args.model), precision=getattr(args, "precision", "fp32"),
                        compile=getattr(args, "compile", False), triton=getattr(args, "triton", False))
    renderer.model(args.model)  # load once now: a bad model fails here, not in the first job
    manager = JobManager(renderer, queue_size=args.queue_size, keep_jobs=args.keep_jobs,
                         keep_seconds=args.keep_minutes * 60, keep_gbuffers=args.keep_gbuffers,
                         relight_cache_bytes=int(getattr(args, "relight_cache_mb", 2048) * 2**20))
    token = secrets.token_urlsafe(32)
    sock = bind(args.host, args.port)
    host = f"[{args.host}]" if ":" in args.host else args.host
    info = {"url": f"http://{host}:{sock.getsockname()[1]}", "token": token, "pid": os.getpid(),
            "version": __version__}
    logs.event("service.starting", device=str(renderer.device), model=args.model, url=info["url"],
               threads=torch.get_num_threads())
    app = create_app(manager, token=token, max_body=int(args.max_upload_mb * 2**20), max_pixels=args.max_pixels,
                     allow_remote=args.allow_remote)
    protocol = type("ServiceProtocol", (GuardedH11Protocol,), {"max_connections": args.max_connections})
    config = uvicorn.Config(app, http=protocol, ws="none", log_config=None, access_log=False,
                            timeout_keep_alive=KEEP_ALIVE_TIMEOUT, timeout_graceful_shutdown=10)
    path = service_file_path()
    try:
        AdvertisedServer(config, path, info).run(sockets=[sock])
    finally:
        remove_discovery_file(path, token)
        sock.close()
    return 0

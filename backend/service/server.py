"""Start-up and shutdown of `pbnds serve`: model, socket, discovery file, uvicorn."""

from __future__ import annotations

import argparse
import os
import secrets
import socket
from pathlib import Path

import uvicorn

from .. import __version__
from ..jobformat import Options
from ..renderer import Renderer
from . import logs
from .app import create_app
from .jobs import JobManager
from .security import is_loopback_host, remove_discovery_file, service_file_path, write_discovery_file


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
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
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
    for name in ("port", "queue_size", "max_upload_mb", "keep_jobs", "keep_gbuffers"):
        if getattr(args, name) < (0 if name == "port" else 1):
            raise ValueError(f"--{name.replace('_', '-')} must be {'non-negative' if name == 'port' else 'positive'}")
    logs.setup()
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
    logs.event("service.starting", device=str(renderer.device), model=args.model, url=info["url"])
    app = create_app(manager, token=token, max_body=int(args.max_upload_mb * 2**20), allow_remote=args.allow_remote)
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=10)
    path = service_file_path()
    try:
        AdvertisedServer(config, path, info).run(sockets=[sock])
    finally:
        remove_discovery_file(path, token)
        sock.close()
    return 0

"""Access control for the service: bearer token, loopback Host header, body size; the discovery file.

The service listens on loopback, yet any web page the user opens can send requests there, and DNS
rebinding can make a foreign name resolve to 127.0.0.1. So every request except health needs the
token (readable only by the user, through the 0600 discovery file) and a loopback Host header.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import os
import re
import tempfile
from pathlib import Path

from .logs import event

HEALTH_PATH = "/v1/health"
NONCE = re.compile(r"^[A-Za-z0-9_-]{16,128}$")
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
_HOST_HEADER = re.compile(r"^(?P<name>\[[0-9a-fA-F:.]+\]|[^:\[\]]+)(?::(?P<port>\d{1,5}))?$")


def is_loopback_host(host: str) -> bool:
    """True for a bind address or host name that only this machine can reach."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def is_loopback_host_header(value: str) -> bool:
    match = _HOST_HEADER.match(value)
    return bool(match) and match["name"].lower() in LOOPBACK_NAMES


def token_proof(token: str, nonce: str) -> str:
    """HMAC-SHA256(token, nonce) in hex: health's answer to a client's nonce, which proves that the service
    holds the discovery file's token without revealing it (a stale file may name a port another program
    has taken since)."""
    return hmac.new(token.encode(), nonce.encode(), hashlib.sha256).hexdigest()


def service_file_path() -> Path:
    """$PBNDS_SERVICE_FILE, else $XDG_CONFIG_HOME/pbnds/service.json (~/.config by default)."""
    override = os.environ.get("PBNDS_SERVICE_FILE")
    if override:
        return Path(override)
    config = os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config"
    return Path(config) / "pbnds" / "service.json"


def write_discovery_file(path: Path, info: dict) -> None:
    """Write the file atomically with mode 0600 in a 0700 directory (the token is a secret)."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.parent.name == "pbnds":  # our own folder; never chmod a folder the user chose for something else
        os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(prefix=".service-", suffix=".json", dir=path.parent)  # mkstemp creates 0600
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(info, handle)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def remove_discovery_file(path: Path, token: str) -> None:
    """Remove the file unless another service has replaced it since."""
    try:
        if json.loads(path.read_text()).get("token") == token:
            path.unlink()
    except (OSError, ValueError):
        pass


class BodyTooLarge(Exception):
    pass


class Guard:
    """ASGI middleware: Host header (403), bearer token (401) and body size (413), before the app runs.

    The size limit is checked on Content-Length and again on the bytes actually received, so a
    chunked or lying upload stops at the limit too.
    """

    def __init__(self, app, token: str, max_body: int, allow_remote: bool = False):
        self.app = app
        self.token = f"Bearer {token}".encode()
        self.max_body = max_body
        self.allow_remote = allow_remote

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "lifespan":
            return await self.app(scope, receive, send)
        if scope["type"] != "http":
            return await send({"type": "websocket.close", "code": 1008})
        headers = dict(scope["headers"])
        problem = self._check(scope, headers)
        if problem is not None:
            status, detail = problem
            event("request.rejected", status=status, method=scope["method"], path=scope["path"], detail=detail)
            extra = [(b"www-authenticate", b"Bearer")] if status == 401 else []
            return await _reply(send, status, detail, extra)

        received = 0
        answered = False

        async def limited_receive():
            nonlocal received, answered
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.max_body:
                if not answered:
                    answered = True
                    await _reply(send, 413, self._too_large())
                raise BodyTooLarge()
            return message

        async def guarded_send(message) -> None:
            if not answered:  # after a 413 the app's own answer (to the aborted read) is dropped
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except BodyTooLarge:
            if not answered:
                await _reply(send, 413, self._too_large())

    def _check(self, scope, headers: dict[bytes, bytes]) -> tuple[int, str] | None:
        host = headers.get(b"host", b"").decode("latin-1")
        if not self.allow_remote and not is_loopback_host_header(host):
            return 403, (f"Host header {host!r} is not a loopback name (localhost, 127.0.0.1, [::1]); "
                         "start the service with --allow-remote to serve other names")
        if scope["path"] != HEALTH_PATH:
            given = headers.get(b"authorization")
            if given is None:
                return 401, "missing bearer token: send 'Authorization: Bearer <token>' with the token from " \
                            "the service's discovery file"
            if not hmac.compare_digest(given, self.token):
                return 401, "wrong bearer token: take the token from the running service's discovery file"
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return 400, f"Content-Length {length.decode('latin-1')!r} is not a number"
            if int(length) > self.max_body:
                return 413, self._too_large(int(length))
        return None

    def _too_large(self, length: int | None = None) -> str:
        size = f" ({length / 2**20:.1f} MiB)" if length is not None else ""
        return (f"request body too large{size}: this service accepts at most {self.max_body / 2**20:.0f} MiB "
                "(pbnds serve --max-upload-mb)")


async def _reply(send, status: int, detail: str, headers: list | None = None) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            *(headers or [])]})
    await send({"type": "http.response.body", "body": body})

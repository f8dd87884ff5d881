"""`pbnds serve` and `pbnds bench-service`, registered by backend/cli.py through add_parser()."""

from __future__ import annotations

import argparse

DEFAULT_PORT = 8765
DEFAULT_MAX_PIXELS = 8192 * 8192


def add_parser(commands) -> None:
    serve = commands.add_parser("serve", help="run the local shading service (docs/service.md)")
    serve.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1; others need "
                       "--allow-remote)")
    serve.add_argument("--port", type=int, default=DEFAULT_PORT,
                       help=f"port (default {DEFAULT_PORT}; 0 picks a free one)")
    serve.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda or cuda:N")
    serve.add_argument("--model", default="default", help="model for jobs that name none; loaded at start-up")
    serve.add_argument("--allow-remote", action="store_true", help="allow a non-loopback bind address and any "
                       "Host header (the token is still required; traffic is not encrypted)")
    serve.add_argument("--queue-size", type=int, default=8, help="queued jobs before 503 (default 8)")
    serve.add_argument("--max-upload-mb", type=float, default=1024, help="largest request body (default 1024)")
    serve.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="largest image (width x height) "
                       "a job or an uploaded EXR may declare; checked on the headers before decoding (default "
                       f"{DEFAULT_MAX_PIXELS} = 8192x8192)")
    serve.add_argument("--max-connections", type=int, default=256, help="open connections; beyond it the oldest "
                       "one without a request in progress is closed (default 256)")
    serve.add_argument("--keep-jobs", type=int, default=32, help="finished jobs (and results) kept (default 32)")
    serve.add_argument("--keep-minutes", type=float, default=60, help="how long finished jobs are kept (default 60)")
    serve.add_argument("--keep-gbuffers", type=int, default=4, help="prepared G-buffers kept for relighting "
                       "(default 4)")
    serve.add_argument("--relight-cache-mb", type=float, default=2048, help="memory for relight caches (12 bytes "
                       "per pixel and ray; relights with uniform, stratified or cosine rays reuse them) (default 2048)")
    serve.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                       help="hidden-layer matrix products of the default shader (default fp32; docs/performance.md)")
    serve.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice); /v1/health "
                       "reports the number in use")
    serve.add_argument("--compile", action="store_true", help="torch.compile the fast shading path (first job "
                       "compiles; falls back to eager where it cannot)")
    serve.add_argument("--triton", action="store_true", help="fused Triton kernel for shared ray sets on CUDA "
                       "(backend/fastpath_triton.py; not yet measured on a GPU)")
    serve.set_defaults(handler=cmd_serve)

    from .bench import add_parser as add_bench_parser

    add_bench_parser(commands)


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import serve

    return serve(args)

"""``kvpo reward-server``: one reward model served over HTTP on the local machine.

    python -m kvpo.rewards.server --scorer video_hpsv3 --path /ckpt/HPSv3 \\
        --base-model /ckpt/Qwen2-VL-7B-Instruct --port 8100
    # the trainer: reward_model=http://127.0.0.1:8100/video_hpsv3

For a scorer that needs its own Python environment (another transformers, the ``hpsv3`` package,
...): this module needs only torch, safetensors, numpy, pyyaml and tqdm next to kvpo, and
``--scorer`` takes a registered name or ``pkg.module:Factory`` (any callable with the reward
contract of :mod:`kvpo.rewards.registry`).

Endpoints (format in :mod:`kvpo.rewards.wire`): ``GET /<name>`` (or ``/health``) answers
``{"name", "names", "device"}``; ``POST /<name>`` scores a batch. Requests are scored one at a
time (a lock), on ``--device``. A malformed request gets a 4xx JSON error and the server keeps
serving; a scorer exception gets a 500 with its message. Built on the standard library's
``http.server`` (threads, HTTP/1.1), bound to 127.0.0.1 unless ``--host`` says otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import traceback
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch
import yaml

from kvpo.rewards.registry import resolve_reward
from kvpo.rewards.wire import BadRequest, decode_request, encode_scores

MAX_BODY = 4 << 30  # bytes


class RewardServer(ThreadingHTTPServer):
    """A threading HTTP server around one reward model ``scorer`` served as ``/<name>``."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(
        self, scorer, name: str, address=("127.0.0.1", 0), device="cpu", max_body=MAX_BODY
    ):
        super().__init__(address, _Handler)
        self.scorer, self.name, self.device, self.max_body = (
            scorer,
            name,
            torch.device(device),
            max_body,
        )
        self.lock = threading.Lock()

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://{host}:{port}/{self.name}"

    def info(self) -> dict:
        return {"name": self.name, "names": list(self.scorer.names), "device": str(self.device)}

    def score(self, body: bytes) -> bytes:
        videos, prompts, metadata = decode_request(body)
        with self.lock, torch.no_grad():
            out = self.scorer(videos.to(self.device), prompts, metadata)
        missing = [n for n in self.scorer.names if n not in out]
        if missing:
            raise RuntimeError(f"the scorer did not return its components {missing}")
        for name in self.scorer.names:
            if tuple(out[name].shape) != (len(prompts),):
                raise RuntimeError(f"component {name!r} has shape {tuple(out[name].shape)}, "
                                   f"expected ({len(prompts)},)")  # fmt: skip
        return encode_scores(out, self.scorer.names)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: RewardServer
    timeout = 300  # seconds a client may stall mid-request

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        sys.stderr.write(f"[reward-server] {self.address_string()} {format % args}\n")

    def _reply(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, message: str) -> None:
        self.close_connection = True
        self._reply(status, json.dumps({"error": message}).encode(), "application/json")

    def _path_ok(self) -> bool:
        if self.path.rstrip("/") == f"/{self.server.name}":
            return True
        self._error(HTTPStatus.NOT_FOUND, f"no scorer at {self.path!r}; this server serves "
                                          f"/{self.server.name}")  # fmt: skip
        return False

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path.rstrip("/") == "/health" or self._path_ok():
            self._reply(HTTPStatus.OK, json.dumps(self.server.info()).encode(), "application/json")

    def do_POST(self):  # noqa: N802
        if not self._path_ok():
            return
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            return self._error(HTTPStatus.LENGTH_REQUIRED, "a Content-Length header is required")
        if int(length) > self.server.max_body:
            return self._error(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body of {length} bytes; "
                               f"the limit is {self.server.max_body}")  # fmt: skip
        body = self.rfile.read(int(length))
        if len(body) != int(length):
            return self._error(
                HTTPStatus.BAD_REQUEST, f"body ended after {len(body)} of {length} bytes"
            )
        try:
            answer = self.server.score(body)
        except BadRequest as err:
            return self._error(HTTPStatus.BAD_REQUEST, str(err))
        except Exception as err:
            traceback.print_exc()
            return self._error(HTTPStatus.INTERNAL_SERVER_ERROR, f"{type(err).__name__}: {err}")
        self._reply(HTTPStatus.OK, answer, "application/octet-stream")

    def _unsupported(self):
        self._error(
            HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} is not supported; use GET or POST"
        )

    do_PUT = do_DELETE = do_PATCH = _unsupported  # noqa: N815


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kvpo reward-server", description=__doc__.split("\n\n")[0])
    p.add_argument("--scorer", required=True, help="a registered reward name or pkg.module:Factory")
    p.add_argument("--path", help="the scorer's weights (file or directory, as released)")
    p.add_argument("--base-model", help="the Qwen2-VL base directory of a Qwen2-VL scorer")
    p.add_argument("--batch-size", type=int, help="the scorer's batch size")
    p.add_argument(
        "--offload", action="store_true", help="keep the scorer on the CPU between calls"
    )
    p.add_argument(
        "--option", action="append", default=[], metavar="KEY=VALUE",
        help="another scorer option (the value is read as YAML); repeatable",
    )  # fmt: skip
    p.add_argument("--name", help="the URL path (default: the scorer's name)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8100, help="port (0: any free port)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, help="torch intra-op threads")
    p.add_argument("--max-body-mb", type=int, default=MAX_BODY >> 20)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    options = {}
    for item in args.option:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise SystemExit(f"--option wants KEY=VALUE, got {item!r}")
        options[key.replace("-", "_")] = yaml.safe_load(value)
    scorer = resolve_reward(
        args.scorer, path=args.path, base_model=args.base_model, batch_size=args.batch_size,
        offload=args.offload or None, **options,
    )  # fmt: skip
    name = args.name or args.scorer.rpartition(":")[2]
    server = RewardServer(scorer, name, (args.host, args.port), args.device, args.max_body_mb << 20)
    print(f"serving {args.scorer} ({', '.join(scorer.names)}) at {server.url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""A reward model served by ``kvpo reward-server``: ``reward_model=http://127.0.0.1:P/NAME``.

:class:`RemoteReward` has the reward contract: it sends the clips as 8-bit uint8 tensors (the
scores equal the in-process scorer's on ``round(255 x) / 255``), ``batch_size`` videos per
request (0: all), with a ``timeout`` per request and up to ``retries`` retries after a refused
connection, a dropped one, a timeout or a 5xx answer, waiting ``backoff * 2^i`` seconds (at most
``max_backoff``) between tries.

When the server stays down through the retries, the call returns NaN for every component and
sets :attr:`RemoteReward.failure` (also printed to stderr): the trainer skips the step as it does
a non-finite reward (on every rank alike), the weights and checkpoints stay as they were, and
``max_consecutive_skips`` such steps in a row stop the run. A 4xx answer (the request itself is
wrong) raises :class:`ValueError` with the server's message.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import torch

from kvpo.rewards.placement import batches
from kvpo.rewards.wire import decode_scores, encode_request

TRANSIENT = (ConnectionError, socket.timeout, TimeoutError, http.client.HTTPException, OSError)


class ServerError(RuntimeError):
    """A 5xx answer (the scorer failed on the server)."""


class RemoteReward:
    """The reward served at ``url`` (see the module docstring). ``names`` are asked of the
    server on construction (with the same retries): a server that is not up by then is one
    ConnectionError saying how to start it."""

    def __init__(
        self,
        url: str,
        *,
        batch_size: int = 0,
        timeout: float = 600.0,
        retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
    ):
        parts = urlsplit(url)
        if parts.scheme != "http" or not parts.hostname or not parts.path.strip("/"):
            raise ValueError(f"reward server URL must be http://HOST:PORT/NAME, got {url!r}")
        self.url, self.host, self.port = url, parts.hostname, parts.port or 80
        self.path = "/" + parts.path.strip("/")
        self.batch_size, self.timeout = batch_size, timeout
        self.retries, self.backoff, self.max_backoff = retries, backoff, max_backoff
        self.failure: str | None = None
        try:
            info = json.loads(self._with_retries("GET", None))
        except (ConnectionError, ServerError) as err:
            raise ConnectionError(
                f"no reward server at {url} ({err}); start one with: kvpo reward-server "
                f"--scorer {self.path[1:]} --path <weights> --port {self.port}"
            ) from err
        self.names = tuple(info["names"])

    def _request(self, method: str, body: bytes | None) -> bytes:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=self.timeout)
        try:
            headers = {"Content-Type": "application/octet-stream"} if body is not None else {}
            conn.request(method, self.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        finally:
            conn.close()
        if response.status >= 400:
            try:
                message = json.loads(data)["error"]
            except (ValueError, KeyError, TypeError):
                message = data[:500].decode(errors="replace")
            error = ServerError if response.status >= 500 else ValueError
            raise error(f"reward server {self.url} answered {response.status}: {message}")
        return data

    def _with_retries(self, method: str, body: bytes | None) -> bytes:
        """The answer's body; ConnectionError after ``retries`` failed retries."""
        errors = []
        for attempt in range(self.retries + 1):
            if attempt:
                time.sleep(min(self.backoff * 2 ** (attempt - 1), self.max_backoff))
            try:
                return self._request(method, body)
            except (ServerError, *TRANSIENT) as err:
                errors.append(f"{type(err).__name__}: {err}")
        raise ConnectionError(f"{len(errors)} tries failed, the last with {errors[-1]}")

    def __call__(
        self,
        videos: torch.Tensor,
        prompts: Sequence[str],
        metadata: Mapping[str, Any] | None = None,
    ) -> dict[str, torch.Tensor]:
        """``{name: [B] fp32}`` on the videos' device; NaN when the server stays down."""
        pieces = []
        self.failure = None
        for rows in batches(videos.shape[0], self.batch_size):
            meta = None if metadata is None else {
                k: v[rows] if isinstance(v, list) and len(v) == videos.shape[0] else v
                for k, v in metadata.items()
            }  # fmt: skip
            body = encode_request(videos[rows], list(prompts[rows]), meta)
            try:
                pieces.append(decode_scores(self._with_retries("POST", body)))
            except ConnectionError as err:
                self.failure = f"reward server {self.url} unavailable: {err}"
                print(f"[kvpo] {self.failure}; the step's rewards are NaN", file=sys.stderr)
                nan = torch.full((videos.shape[0],), float("nan"), device=videos.device)
                return {name: nan.clone() for name in self.names}
        return {
            name: torch.cat([p[name] for p in pieces]).to(videos.device, torch.float32)
            for name in self.names
        }

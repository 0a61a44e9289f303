"""A trained model behind a websocket policy server (`vlaflow serve`), as openpi and StarVLA serve
theirs: on connecting, a client receives the model's metadata; then each binary message it sends
(msgpack, `vlaflow.serving.wire`) gets one reply.

    {"images": {camera: (H, W, 3) uint8}, "state": (state_dim,), "prompt": str}
        -> {"actions": (chunk_size, action_dim) in robot units, "reasoning": str,
            "server_timing": {"infer_ms", "batch"}}        ("instruction" may stand for "prompt")
    {"question": str, "image": (H, W, 3) uint8, optional}  -> {"answer": str}   (the VL expert)
    {"reset": {"seed": int}}                                -> {"reset": {"seed": int}}
    anything malformed                                      -> {"error": str}; the connection stays

Action requests that arrive together, from one client or several, are answered in one batch (up
to `max_batch`, gathered for at most `batch_wait_ms`); one generator draws the action noise, so a
client that resets it with a seed and asks alone gets the in-process result. A message larger than
`max_message_mib` closes its connection with code 1009 (message too big). HTTP `GET /healthz`
answers "OK", `GET /metadata` the metadata as JSON, `GET /` a page to chat with the model and see
the action chunk it predicts (`page.html`: it speaks the same messages from the browser).
"""

import asyncio
import contextlib
import http
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from websockets.asyncio.server import ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from vlaflow.data.images import decode_frame
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.policy import Policy
from vlaflow.evaluation.vqa import answer_messages
from vlaflow.serving.wire import WireError, pack, unpack

logger = logging.getLogger(__name__)

HEALTH_PATH = "/healthz"
METADATA_PATH = "/metadata"
PAGE_PATH = "/"
PAGE = Path(__file__).with_name("page.html")  # one page to ask the model and watch it act


class RequestError(ValueError):
    """A request the server understood as msgpack but cannot answer."""


@dataclass
class _Job:
    kind: str  # "act", "chat" or "reset"
    request: dict
    reply: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


def model_metadata(policy: Policy, model_dir: Path) -> dict:
    """What a client needs to talk to the model: its cameras and their image size, dimensions,
    chunk size, and its training config."""
    return {
        "model": Path(model_dir).resolve().name,
        "cameras": list(policy.config["data"]["cameras"]),
        "image_size": list(policy.image_size),
        "state_dim": policy.state_dim,
        "action_dim": policy.action_dim,
        "chunk_size": policy.chunk_size,
        "config": policy.config,
    }


class PolicyServer:
    def __init__(
        self,
        model_dir: Path,
        *,
        max_batch: int = 8,
        batch_wait_ms: float = 5.0,
        max_message_mib: float = 32.0,
        max_new_tokens: int = 64,
        seed: int = 0,
    ):
        if max_batch < 1 or batch_wait_ms < 0 or max_message_mib <= 0 or max_new_tokens < 1:
            raise VlaflowError(
                f"max_batch {max_batch}, batch_wait_ms {batch_wait_ms}, max_message_mib {max_message_mib}, "
                f"max_new_tokens {max_new_tokens}: each must be positive (batch_wait_ms may be 0)"
            )
        self.policy = Policy(model_dir, seed)
        self.metadata = model_metadata(self.policy, model_dir)
        self.max_batch, self.batch_wait = max_batch, batch_wait_ms / 1000
        self.max_message_bytes = int(max_message_mib * 2**20)
        self.max_new_tokens = max_new_tokens
        self._jobs: asyncio.Queue[_Job] | None = None

    # --- serving ---

    async def serve(self, host: str, port: int, started: asyncio.Future | None = None) -> None:
        """Serve until cancelled; `started` gets the bound (host, port) once clients can connect."""
        self._jobs = asyncio.Queue()
        worker = asyncio.create_task(self._answer_jobs())
        try:
            async with serve(
                self._connection,
                host,
                port,
                max_size=self.max_message_bytes,
                compression=None,
                process_request=self._http,
            ) as server:
                bound = next(iter(server.sockets)).getsockname()[:2]
                logger.info("serving %s on ws://%s:%d", self.metadata["model"], *bound)
                if started is not None:
                    started.set_result(bound)
                await server.serve_forever()
        except BaseException as error:
            if started is not None and not started.done():
                started.set_exception(error)
            raise
        finally:
            worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await worker

    def _http(self, connection: ServerConnection, request: Request) -> Response | None:
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return None  # the websocket handshake, on any path
        if request.path == PAGE_PATH:
            return _respond(connection, PAGE.read_text(encoding="utf-8"), "text/html; charset=utf-8")
        if request.path == HEALTH_PATH:
            return connection.respond(http.HTTPStatus.OK, "OK\n")
        if request.path == METADATA_PATH:
            return _respond(connection, json.dumps(self.metadata) + "\n", "application/json")
        return connection.respond(http.HTTPStatus.NOT_FOUND, f"{request.path}: not found\n")

    async def _connection(self, connection: ServerConnection) -> None:
        try:
            await connection.send(pack(self.metadata))
            async for data in connection:
                await connection.send(pack(await self._reply(data)))
        except ConnectionClosed:
            pass

    async def _reply(self, data) -> dict:
        try:
            message = unpack(data)
            job = _Job(*self._parse(message))
            await self._jobs.put(job)
            return await job.reply
        except (WireError, RequestError) as error:
            return {"error": str(error)}

    # --- requests ---

    def _parse(self, message) -> tuple[str, dict]:
        if not isinstance(message, dict):
            raise RequestError(f"a request is a map, not a {type(message).__name__}")
        if "reset" in message:
            seed = message["reset"].get("seed") if isinstance(message["reset"], dict) else None
            if not isinstance(seed, (int, np.integer)) or isinstance(seed, bool):
                raise RequestError('reset: expected {"seed": <integer>}')
            return "reset", {"seed": int(seed)}
        if "question" in message:
            question, image = message["question"], message.get("image")
            if not isinstance(question, str) or not question.strip():
                raise RequestError("question: expected a non-empty text")
            return "chat", {"question": question, "image": None if image is None else self._frame("image", image)}
        return "act", self._observation(message)

    def _observation(self, message: dict) -> dict:
        instruction = message.get("prompt", message.get("instruction"))
        if not isinstance(instruction, str) or not instruction.strip():
            raise RequestError('prompt: expected the instruction as text ("prompt" or "instruction")')
        images = message.get("images")
        if not isinstance(images, dict):
            raise RequestError(f"images: expected a map of camera name to frame, for {self.metadata['cameras']}")
        missing = [camera for camera in self.metadata["cameras"] if camera not in images]
        if missing:
            raise RequestError(
                f"images: no frame for camera {missing[0]!r} (the model takes {self.metadata['cameras']})"
            )
        frames = [self._frame(f"images.{camera}", images[camera]) for camera in self.metadata["cameras"]]
        state = message.get("state")
        if not isinstance(state, np.ndarray) or state.shape != (self.policy.state_dim,):
            shape = state.shape if isinstance(state, np.ndarray) else type(state).__name__
            raise RequestError(f"state: expected an array of shape ({self.policy.state_dim},), got {shape}")
        if not np.all(np.isfinite(state)):
            raise RequestError("state: not finite")
        return {"frames": frames, "state": state.astype(np.float64), "instruction": instruction}

    @staticmethod
    def _frame(name: str, frame) -> np.ndarray:
        if not isinstance(frame, np.ndarray) or frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
            shape = f"{frame.shape} {frame.dtype}" if isinstance(frame, np.ndarray) else type(frame).__name__
            raise RequestError(f"{name}: expected an (height, width, 3) uint8 frame, got {shape}")
        if min(frame.shape[:2]) < 1:
            raise RequestError(f"{name}: an empty frame")
        return frame

    # --- the model, one job or batch at a time ---

    async def _answer_jobs(self) -> None:
        held: list[_Job] = []  # jobs that arrived while a batch was gathered
        while True:
            job = held.pop(0) if held else await self._jobs.get()
            batch = [job]
            if job.kind == "act":
                deadline = asyncio.get_running_loop().time() + self.batch_wait
                while len(batch) < self.max_batch and not held:
                    try:
                        next_job = await asyncio.wait_for(
                            self._jobs.get(), max(0.0, deadline - asyncio.get_running_loop().time())
                        )
                    except TimeoutError:
                        break
                    (batch if next_job.kind == "act" else held).append(next_job)
            try:
                replies = await asyncio.to_thread(self._run, batch)
            except Exception as error:  # a failure of the model answers the request; the server stays up
                logger.exception("answering %d %s request(s) failed", len(batch), job.kind)
                replies = [{"error": f"internal error: {type(error).__name__}: {error}"}] * len(batch)
            for pending, reply in zip(batch, replies):
                if not pending.reply.done():
                    pending.reply.set_result(reply)

    @torch.no_grad()
    def _run(self, batch: list[_Job]) -> list[dict]:
        kind = batch[0].kind
        if kind == "reset":
            self.policy.reseed(batch[0].request["seed"])
            return [{"reset": batch[0].request}]
        if kind == "chat":
            request = batch[0].request
            message = [] if request["image"] is None else [decode_frame(request["image"])]
            answer = answer_messages(
                self.policy.model, self.policy.processor, [message + [request["question"]]], self.max_new_tokens
            )[0]
            return [{"answer": answer.strip()}]
        started = time.perf_counter()
        observed = [self.policy.observe(job.request["frames"], job.request["state"]) for job in batch]
        output = self.policy.predict(
            [images for images, _ in observed],
            np.stack([state for _, state in observed]),
            [job.request["instruction"] for job in batch],
        )
        timing = {"infer_ms": 1000 * (time.perf_counter() - started), "batch": len(batch)}
        return [
            {"actions": actions, "reasoning": reasoning, "server_timing": timing}
            for actions, reasoning in zip(output.actions, output.reasoning)
        ]


def _respond(connection: ServerConnection, body: str, content_type: str) -> Response:
    response = connection.respond(http.HTTPStatus.OK, body)
    del response.headers["Content-Type"]  # respond()'s text/plain
    response.headers["Content-Type"] = content_type
    return response


def run_server(model_dir: Path, host: str, port: int, **settings) -> None:
    """`vlaflow serve`: serve until interrupted."""
    server = PolicyServer(model_dir, **settings)

    async def main() -> None:
        started = asyncio.get_running_loop().create_future()
        serving = asyncio.create_task(server.serve(host, port, started))
        bound_host, bound_port = await started
        print(f"serving {server.metadata['model']} on ws://{bound_host}:{bound_port}", flush=True)
        await serving

    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass

"""A client of `vlaflow serve` (any openpi-style websocket policy server that speaks its
messages), and a policy that acts through it, for `vlaflow eval robot --server`."""

from contextlib import ExitStack

import numpy as np
from websockets.exceptions import ConnectionClosed, InvalidURI, WebSocketException
from websockets.sync.client import connect

from vlaflow.errors import VlaflowError
from vlaflow.evaluation.policy import PolicyOutput
from vlaflow.serving.wire import WireError, pack, unpack


class PolicyClient:
    """One connection; its `metadata` is what the server sent on connecting."""

    def __init__(self, url: str, timeout: float = 600.0):
        self.url = url
        self._open = ExitStack()
        try:
            self._connection = self._open.enter_context(
                connect(url, max_size=None, compression=None, open_timeout=timeout)
            )
        except (OSError, InvalidURI, WebSocketException, TimeoutError) as error:
            raise VlaflowError(f"{url}: cannot connect to the policy server ({error})") from None
        self._timeout = timeout
        self.metadata = self._receive()

    def _receive(self) -> dict:
        try:
            return unpack(self._connection.recv(timeout=self._timeout))
        except ConnectionClosed as error:
            raise VlaflowError(f"{self.url}: the server closed the connection ({error})") from None
        except (WireError, TimeoutError) as error:
            raise VlaflowError(f"{self.url}: {error}") from None

    def request(self, message: dict) -> dict:
        """Send one request; its reply, or a VlaflowError with the server's error."""
        try:
            self._connection.send(pack(message))
        except ConnectionClosed as error:
            raise VlaflowError(f"{self.url}: the server closed the connection ({error})") from None
        reply = self._receive()
        if "error" in reply:
            raise VlaflowError(f"{self.url}: {reply['error']}")
        return reply

    def act(self, images: dict[str, np.ndarray], state: np.ndarray, instruction: str) -> tuple[np.ndarray, str]:
        reply = self.request({"images": images, "state": np.asarray(state), "prompt": instruction})
        return reply["actions"], reply["reasoning"]

    def chat(self, question: str, image: np.ndarray | None = None) -> str:
        return self.request({"question": question} | ({} if image is None else {"image": image}))["answer"]

    def reset(self, seed: int) -> None:
        self.request({"reset": {"seed": int(seed)}})

    def close(self) -> None:
        self._open.close()


class RemotePolicy:
    """`vlaflow.evaluation.policy.Policy`'s acting side, answered by a policy server: raw frames
    and joint positions go out, un-normalised action chunks come back."""

    def __init__(self, url: str):
        self.client = PolicyClient(url)
        metadata = self.client.metadata
        self.config = metadata["config"]
        self.cameras = metadata["cameras"]
        self.image_size = tuple(metadata["image_size"])
        self.chunk_size, self.action_dim, self.state_dim = (
            metadata["chunk_size"], metadata["action_dim"], metadata["state_dim"]
        )  # fmt: skip

    def reseed(self, seed: int) -> None:
        self.client.reset(seed)

    def act(self, frames: list[np.ndarray], qpos: np.ndarray, instruction: str) -> PolicyOutput:
        images = {camera: np.ascontiguousarray(frame, dtype=np.uint8) for camera, frame in zip(self.cameras, frames)}
        actions, reasoning = self.client.act(images, qpos, instruction)
        return PolicyOutput(actions[None], [reasoning])

"""`vlaflow serve`: the trained model behind a real websocket server (in a thread of the test
process, and once as the command), talked to by real clients: the in-process answers, a closed
loop through the server equal to the in-process one, bad requests answered without harm, and
concurrent clients batched."""

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from tests.browser import Browser
from tests.conftest import SIM_DEMO_SIZE
from tests.system_packages import PackagesUnavailable
from vlaflow.errors import VlaflowError
from vlaflow.evaluation.policy import Policy
from vlaflow.evaluation.robot import evaluate_closed_loop
from vlaflow.evaluation.vqa import answer_messages
from vlaflow.data.images import decode_frame
from vlaflow.serving.client import PolicyClient
from vlaflow.serving.server import PolicyServer
from vlaflow.serving.wire import pack, unpack

pytestmark = pytest.mark.slow
INSTRUCTION = "Pick up the cube with the right arm and hand it over to the left arm."


class ServerThread:
    """A PolicyServer on a free port, its event loop in a thread."""

    def __init__(self, server: PolicyServer):
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        self.task, (host, port) = asyncio.run_coroutine_threadsafe(self._start(server), self.loop).result(60)
        self.url, self.http = f"ws://{host}:{port}", f"http://{host}:{port}"

    async def _start(self, server: PolicyServer):
        started = asyncio.get_running_loop().create_future()
        task = asyncio.create_task(server.serve("127.0.0.1", 0, started))
        return task, await started

    def stop(self) -> None:
        async def cancel() -> None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

        asyncio.run_coroutine_threadsafe(cancel(), self.loop).result(60)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.fixture(scope="module")
def served(trained_model):
    server = ServerThread(PolicyServer(trained_model, max_batch=4, batch_wait_ms=200, max_message_mib=1))
    yield server
    server.stop()


def observation(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (*SIM_DEMO_SIZE, 3), dtype=np.uint8), rng.normal(scale=0.3, size=14)


def test_a_client_gets_the_metadata_and_the_in_process_action_chunk(served, trained_model):
    client = PolicyClient(served.url)
    metadata = client.metadata
    assert (metadata["cameras"], metadata["state_dim"], metadata["action_dim"]) == (["top"], 14, 14)
    assert metadata["chunk_size"] == 10 and metadata["config"]["data"]["cameras"] == ["top"]
    frame, qpos = observation(0)
    client.reset(5)
    actions, reasoning = client.act({"top": frame}, qpos, INSTRUCTION)
    policy = Policy(trained_model)
    policy.reseed(5)
    expected = policy.act([frame], qpos, INSTRUCTION)
    assert actions.shape == (10, 14)
    np.testing.assert_array_equal(actions, expected.actions[0])
    assert reasoning == expected.reasoning[0]
    client.close()


def test_health_and_metadata_answer_over_http(served):
    with urllib.request.urlopen(f"{served.http}/healthz", timeout=30) as response:
        assert response.status == 200 and response.read() == b"OK\n"
    with urllib.request.urlopen(f"{served.http}/metadata", timeout=30) as response:
        assert json.loads(response.read())["action_dim"] == 14


def test_a_chat_request_is_answered_by_the_vision_language_expert(served, trained_model):
    frame, _ = observation(1)
    client = PolicyClient(served.url)
    answer = client.chat("What colour is the cube?", frame)
    policy = Policy(trained_model)
    expected = answer_messages(policy.model, policy.processor, [[decode_frame(frame), "What colour is the cube?"]], 64)
    assert answer == expected[0].strip()
    client.close()


def test_the_closed_loop_through_the_server_is_the_in_process_one(served, trained_model, tmp_path):
    settings = dict(episodes=2, seed=3, max_steps=12, video_size=None)
    local = evaluate_closed_loop(trained_model, tmp_path / "local", **settings)
    remote = evaluate_closed_loop(trained_model, tmp_path / "remote", server=served.url, **settings)
    for result in (local, remote):
        for task in result.values():
            task.pop("seconds")
    assert remote == local
    assert remote["transfer_cube"]["first_rollout_reasoning"]


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (b"\xc1", "not msgpack"),
        (pack([1, 2]), "a request is a map, not a list"),
        (pack({"state": np.zeros(14), "prompt": "go"}), "images: expected a map of camera name to frame"),
        (pack({"images": {"wrist": np.zeros((4, 4, 3), np.uint8)}, "state": np.zeros(14), "prompt": "go"}),
         "images: no frame for camera 'top'"),
        (pack({"images": {"top": np.zeros((4, 4), np.uint8)}, "state": np.zeros(14), "prompt": "go"}),
         r"images.top: expected an \(height, width, 3\) uint8 frame, got \(4, 4\) uint8"),
        (pack({"images": {"top": np.zeros((4, 4, 3), np.float32)}, "state": np.zeros(14), "prompt": "go"}),
         "images.top: expected an"),
        (pack({"images": {"top": np.zeros((4, 4, 3), np.uint8)}, "state": np.zeros(7), "prompt": "go"}),
         r"state: expected an array of shape \(14,\), got \(7,\)"),
        (pack({"images": {"top": np.zeros((4, 4, 3), np.uint8)}, "state": np.full(14, np.nan), "prompt": "go"}),
         "state: not finite"),
        (pack({"images": {"top": np.zeros((4, 4, 3), np.uint8)}, "state": np.zeros(14)}), "prompt: expected"),
        (pack({"reset": {"seed": "one"}}), "reset: expected"),
        (pack({"question": ""}), "question: expected a non-empty text"),
        (pack({b"__ndarray__": True, b"data": b"\0" * 8, b"dtype": "|O", b"shape": [1]}), "dtype object are refused"),
        (pack({b"__ndarray__": True, b"data": b"\0" * 3, b"dtype": "<f4", b"shape": [1]}), "does not match its dtype"),
    ],
)  # fmt: skip
def test_a_bad_request_gets_an_error_reply_and_the_connection_goes_on(served, message, error):
    with connect(served.url, max_size=None) as connection:
        unpack(connection.recv(timeout=60))  # the metadata
        connection.send(message)
        reply = unpack(connection.recv(timeout=60))
        assert set(reply) == {"error"}
        assert re.search(error, reply["error"]), reply
        frame, qpos = observation(2)
        connection.send(pack({"images": {"top": frame}, "state": qpos, "prompt": INSTRUCTION}))
        assert unpack(connection.recv(timeout=120))["actions"].shape == (10, 14)


def test_a_text_frame_and_an_oversized_message_are_refused(served):
    with connect(served.url, max_size=None) as connection:
        unpack(connection.recv(timeout=60))
        connection.send("hello")
        assert unpack(connection.recv(timeout=60)) == {"error": "a text frame; messages are binary msgpack"}
        connection.send(pack({"images": {"top": np.zeros((1024, 1024, 3), np.uint8)}}))  # 3 MiB > 1 MiB
        with pytest.raises(ConnectionClosed) as closed:
            connection.recv(timeout=60)
        assert closed.value.rcvd.code == 1009  # message too big
    assert PolicyClient(served.url).metadata["action_dim"] == 14  # the server goes on


def test_concurrent_clients_are_answered_in_batches(served):
    clients = [PolicyClient(served.url) for _ in range(4)]
    barrier, replies = threading.Barrier(4), [None] * 4

    def ask(number: int) -> None:
        frame, qpos = observation(10 + number)
        barrier.wait()
        replies[number] = clients[number].request({"images": {"top": frame}, "state": qpos, "prompt": INSTRUCTION})

    threads = [threading.Thread(target=ask, args=(number,)) for number in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert all(reply["actions"].shape == (10, 14) for reply in replies)
    assert max(reply["server_timing"]["batch"] for reply in replies) > 1
    for client in clients:
        client.close()


def test_the_serve_command_prints_its_address_and_serves(trained_model):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    process = subprocess.Popen(
        ["vlaflow", "serve", "--model", str(trained_model), "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        line = process.stdout.readline()
        assert line.startswith(f"serving {trained_model.name} on ws://127.0.0.1:"), line + process.stderr.read()
        client = PolicyClient(line.split()[-1])
        assert client.metadata["chunk_size"] == 10
        client.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_connecting_to_no_server_is_an_error_naming_the_address():
    with pytest.raises(VlaflowError, match=r"ws://127.0.0.1:9: cannot connect to the policy server"):
        PolicyClient("ws://127.0.0.1:9", timeout=5)


def test_the_page_asks_the_model_and_plots_its_action_chunk(served, tmp_path):
    """In headless Chromium: the page served at / connects, answers a question about its image and
    plots the action chunk the model predicts for an instruction, with its reasoning. With
    VLAFLOW_PAGE_SCREENSHOT set, its screenshot is also written there (docs/serve_page.png)."""
    try:
        browser = Browser()
    except PackagesUnavailable as reason:
        pytest.skip(f"no Chromium here: {reason}")
    try:
        browser.open(f"{served.http}/")
        assert "cameras top, state 14, actions 10 × 14" in browser.wait_for(
            "document.getElementById('status').textContent.includes('cameras') && "
            "document.getElementById('status').textContent"
        )
        browser.evaluate("document.getElementById('sample').click()")
        rgba = browser.evaluate("Array.from(context.getImageData(0, 0, frame.width, frame.height).data)")
        frame = np.asarray(rgba, dtype=np.uint8).reshape(96, 128, 4)[..., :3]
        client = PolicyClient(served.url)

        browser.evaluate("document.getElementById('question').value = 'What colour is the cube?'")
        browser.evaluate("document.getElementById('ask').click()")
        browser.wait_for("document.getElementById('answer').dataset.replies === '1'")
        assert browser.evaluate("document.getElementById('answer').textContent") == client.chat(
            "What colour is the cube?", frame
        )

        browser.evaluate("document.getElementById('act').click()")
        assert browser.wait_for("document.getElementById('plot').dataset.plotted") == "10x14"
        _, reasoning = client.act(
            {"top": frame}, np.zeros(14), browser.evaluate("document.getElementById('instruction').value")
        )
        assert browser.evaluate("document.getElementById('reasoning').textContent") == reasoning
        painted = browser.evaluate(
            "Array.from(document.getElementById('plot').getContext('2d').getImageData(0, 0, 900, 320).data)"
        )
        assert len(set(painted)) > 20  # lines in many colours, not a blank canvas
        browser.screenshot(tmp_path / "page.png")
        assert (tmp_path / "page.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("VLAFLOW_PAGE_SCREENSHOT"):
            shutil.copyfile(tmp_path / "page.png", os.environ["VLAFLOW_PAGE_SCREENSHOT"])
        client.close()
    finally:
        browser.close()


def test_the_page_is_served_beside_health_and_other_paths_are_not_found(served):
    with urllib.request.urlopen(f"{served.http}/", timeout=30) as response:
        assert response.headers["Content-Type"].startswith("text/html") and b'<canvas id="plot"' in response.read()
    with pytest.raises(urllib.error.HTTPError) as missing:
        urllib.request.urlopen(f"{served.http}/nothing", timeout=30)
    assert missing.value.code == 404

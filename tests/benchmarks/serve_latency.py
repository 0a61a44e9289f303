"""Latency of `vlaflow serve` per action request, at 1 and 4 concurrent clients, with the tiny
model (ALOHA's dimensions, trained a few steps on simulator demonstrations), the server in this
process and its clients in threads, each asking as soon as its last answer came. With several
clients the server answers their requests in batches; the table shows what that does to each
client's wait and to the requests answered per second.

    python -m tests.benchmarks.serve_latency
    python -m tests.benchmarks.serve_latency --clients 1 2 4 8 --requests 40
"""

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from tests.test_serve import INSTRUCTION, ServerThread, observation
from tests.training_helpers import train_on_sim_demos
from vlaflow.backbone.download import BUILTIN_TINY, download
from vlaflow.backbone.mlp_weights import save_mlp_weights
from vlaflow.serving.client import PolicyClient
from vlaflow.serving.server import PolicyServer
from vlaflow.sim.demos import record_demos


def trained_tiny_model(root: Path) -> Path:
    backbone = download(BUILTIN_TINY, root / "backbone")
    mlp_weights = save_mlp_weights(backbone, root / "mlp.safetensors")
    record_demos(root / "data" / "cube", 2, height=48, width=64, shadows=False, workers=2)
    return train_on_sim_demos(root, ["cube"], backbone, mlp_weights)


def measure(url: str, clients: int, requests: int) -> tuple[list[float], float, list[int]]:
    """Every request's seconds, the wall time of the whole run and the batch sizes seen."""
    connections = [PolicyClient(url) for _ in range(clients)]
    latencies, batches, lock, barrier = [], [], threading.Lock(), threading.Barrier(clients)

    def ask(number: int) -> None:
        frame, qpos = observation(number)
        barrier.wait()
        for _ in range(requests):
            started = time.perf_counter()
            reply = connections[number].request({"images": {"top": frame}, "state": qpos, "prompt": INSTRUCTION})
            with lock:
                latencies.append(time.perf_counter() - started)
                batches.append(reply["server_timing"]["batch"])

    threads = [threading.Thread(target=ask, args=(number,)) for number in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    for connection in connections:
        connection.close()
    return latencies, wall, batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=20, help="requests per client")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = trained_tiny_model(Path(tmp))
        server = ServerThread(PolicyServer(model, max_batch=8, batch_wait_ms=args.batch_wait_ms))
        measure(server.url, 1, 3)  # warm-up
        print(f"{args.requests} requests per client; batch wait {args.batch_wait_ms:g} ms\n")
        print("| clients | p50 ms | p95 ms | requests/s | mean batch |")
        print("|---:|---:|---:|---:|---:|")
        for clients in args.clients:
            latencies, wall, batches = measure(server.url, clients, args.requests)
            p50, p95 = (1000 * float(np.percentile(latencies, q)) for q in (50, 95))
            print(
                f"| {clients} | {p50:.1f} | {p95:.1f} | {len(latencies) / wall:.1f} | {statistics.mean(batches):.2f} |"
            )
        server.stop()


if __name__ == "__main__":
    main()

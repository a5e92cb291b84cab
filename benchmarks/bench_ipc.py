"""Local IPC for the engine process: a Unix socket against TCP loopback and ZeroMQ.

    python -m benchmarks.bench_ipc [--messages 20000] [--repeats 5]
    pip install pyzmq   # optional (not a dependency): adds the ZeroMQ rows

A front and the engine process exchange small frames: a prediction's job (a JSON header
of ~150 bytes) and its answer (~100 bytes). This runs an echo peer in a second process
and measures, for each transport, with the same framing (``service.engine.wire``):

- round trip: one frame out, its answer back, one at a time (a quiet server's latency);
- pipelined: 64 frames in flight (a loaded front), messages per second;
- CPU per message, both processes together: on a 2-core machine the fronts are
  CPU-bound, so this is what an extra hop costs them.

Prints medians over ``--repeats``. ZeroMQ uses DEALER/ROUTER over ``ipc://``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.serving import machine
from service.engine import wire

JOB = wire.Frame(
    {
        "op": "predict",
        "ids": [1],
        "jobs": [
            {
                "meta_model": "0" * 64,
                "key": ["tenant", "client-0001", "0" * 32],
                "inputs": {"rows": [[0.5], [1.5], [2.5], [3.5], [4.5]]},
                "ticket": None,
            }
        ],
    }
)
JOB_BYTES = b"".join(JOB.encode())
IN_FLIGHT = 64
Address = str | tuple[str, int]


def _stream_echo(family: int, address: Address, ready: Any) -> None:
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.bind(address)
    listener.listen(1)
    ready.set()
    sock, _ = listener.accept()
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = wire.FrameReader()
    answer = b"".join(
        wire.Frame({"id": 1, "ok": {"shape": [5, 1], "blob": 0}}, [b"x" * 20]).encode()
    )
    while data := sock.recv(1 << 18):
        frames = reader.feed(data)
        if frames:
            sock.sendall(answer * len(frames))


def _stream_client(family: int, address: Address) -> Callable[[int], None]:
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.connect(address)
    if family == socket.AF_INET:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    reader = wire.FrameReader()

    def exchange(n: int) -> None:  # n frames out in one write, n answers back
        sock.sendall(JOB_BYTES * n)
        got = 0
        while got < n:
            got += len(reader.feed(sock.recv(1 << 18)))

    return exchange


def _zmq_echo(address: str, ready: Any) -> None:
    import zmq

    router = zmq.Context().socket(zmq.ROUTER)
    router.bind(address)
    ready.set()
    answer = b"".join(
        wire.Frame({"id": 1, "ok": {"shape": [5, 1], "blob": 0}}, [b"x" * 20]).encode()
    )
    while True:
        peer, _ = router.recv_multipart()
        router.send_multipart([peer, answer])


def _zmq_client(address: str) -> Callable[[int], None]:
    import zmq

    dealer = zmq.Context().socket(zmq.DEALER)
    dealer.connect(address)

    def exchange(n: int) -> None:
        for _ in range(n):
            dealer.send(JOB_BYTES)
        for _ in range(n):
            dealer.recv()

    return exchange


def measure(
    exchange: Callable[[int], None], messages: int, peer: int
) -> tuple[float, float, float]:
    """(round trip p50 us, pipelined messages/s, CPU us per message of both processes)."""
    for _ in range(200):
        exchange(1)
    trips = []
    for _ in range(min(messages, 5000)):
        start = time.perf_counter()
        exchange(1)
        trips.append(time.perf_counter() - start)
    cpu_before = time.process_time() + _cpu(peer)
    start = time.perf_counter()
    for _ in range(messages // IN_FLIGHT):
        exchange(IN_FLIGHT)
    wall = time.perf_counter() - start
    cpu = time.process_time() + _cpu(peer) - cpu_before
    sent = messages // IN_FLIGHT * IN_FLIGHT
    return statistics.median(trips) * 1e6, sent / wall, cpu / sent * 1e6


def _cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    p.add_argument("--messages", type=int, default=20000)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    print(f"fastadapt bench_ipc: {machine()}")
    print(f"a job frame of {len(JOB_BYTES)} bytes, its answer echoed; medians of {args.repeats}\n")
    folder = tempfile.mkdtemp(prefix="fastadapt-ipc-")
    transports: dict[
        str, tuple[Callable[..., None], tuple[object, ...], Callable[[], Callable[[int], None]]]
    ] = {}
    unix = str(Path(folder) / "s.sock")
    transports["Unix socket"] = (
        _stream_echo,
        (socket.AF_UNIX, unix),
        lambda: _stream_client(socket.AF_UNIX, unix),
    )
    port = _free_port()
    tcp = ("127.0.0.1", port)
    transports["TCP loopback"] = (
        _stream_echo,
        (socket.AF_INET, tcp),
        lambda: _stream_client(socket.AF_INET, tcp),
    )
    try:
        import zmq  # noqa: F401

        zaddr = f"ipc://{folder}/z.sock"
        transports["ZeroMQ ipc://"] = (_zmq_echo, (zaddr,), lambda: _zmq_client(zaddr))
    except ImportError:
        print("(pyzmq is not installed: no ZeroMQ row)\n")
    print("| transport | round trip p50 us | pipelined msg/s | CPU us / message |")
    print("|---|---:|---:|---:|")
    for name, (serve, serve_args, connect) in transports.items():
        ready = multiprocessing.Event()
        peer = multiprocessing.Process(target=serve, args=(*serve_args, ready), daemon=True)
        peer.start()
        ready.wait(10)
        exchange = connect()
        results = [measure(exchange, args.messages, peer.pid or 0) for _ in range(args.repeats)]
        trip, rate, cpu = (statistics.median(r[i] for r in results) for i in range(3))
        print(f"| {name} | {trip:.1f} | {rate:,.0f} | {cpu:.1f} |")
        peer.kill()
        peer.join()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


if __name__ == "__main__":
    main()

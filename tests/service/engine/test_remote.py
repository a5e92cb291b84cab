"""An engine process's protocol: a ``RemoteEngine`` against an ``EngineServer`` on a real
Unix socket (in this process, so a test can stop and restart it), checked against an
``Engine`` in-process: the same jobs answer the same bytes."""

from __future__ import annotations

import socket
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import uvloop

from models.checkpoint import MetaModel
from models.params import to_bytes
from service.engine import AdaptJob, Engine, NotCached, PredictJob, wire
from service.engine.remote import RemoteEngine
from service.engine.server import EngineServer
from service.errors import Unavailable
from tests.service.engine.helpers import adapt_job, settings

SUPPORT = ([[-2.0], [-1.0], [0.5], [1.5], [3.0]], [0.3, -0.2, 0.9, 1.1, -0.4])
QUERIES = [[-1.5], [0.0], [2.5]]
WRONG = to_bytes({"w": torch.zeros(2)})  # params of no meta-model here


class EngineProcess:
    """An ``EngineServer`` on ``path``, serving from a thread until ``stop``."""

    def __init__(self, path: str) -> None:
        self.engine = Engine({}, settings())
        self.engine.start()
        self.server = EngineServer(self.engine, path)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.stop_accepting()
        self.thread.join(5)
        self.server.shutdown(timeout=5)


@pytest.fixture
def socket_path() -> Iterator[str]:
    with tempfile.TemporaryDirectory(prefix="fastadapt-test-") as folder:
        yield str(Path(folder) / "engine.sock")


@pytest.fixture
def process(socket_path: str) -> Iterator[EngineProcess]:
    started = EngineProcess(socket_path)
    yield started
    started.stop()


def front(meta_models: dict[str, MetaModel], path: str) -> RemoteEngine:
    """A front's link, its answers read on a uvloop loop as under uvicorn (whose reader
    makes the socket non-blocking)."""
    loop = uvloop.new_event_loop()
    threading.Thread(target=loop.run_forever, daemon=True).start()
    remote = RemoteEngine(meta_models, settings(), path, loop=loop)
    remote.start()
    assert remote.wait_ready(10)
    return remote


@pytest.fixture
def remote(
    meta_models: dict[str, MetaModel], process: EngineProcess, socket_path: str
) -> Iterator[RemoteEngine]:
    connected = front(meta_models, socket_path)
    yield connected
    connected.stop(5)


@pytest.fixture(scope="module")
def local(meta_models: dict[str, MetaModel]) -> Iterator[Engine]:
    engine = Engine(meta_models, settings())
    engine.start()
    yield engine
    engine.stop()


@pytest.mark.parametrize("name", ["sinusoid", "sinusoid-clipped", "classes", "images"])
def test_an_engine_process_answers_what_the_engine_in_process_answers(
    remote: RemoteEngine, local: Engine, meta_models: dict[str, MetaModel], name: str
) -> None:
    model = meta_models[name]
    d = model.config.input_shape
    g = torch.Generator().manual_seed(7)
    if len(d) > 1:  # images travel as float32 tensors
        x: object = torch.rand(4, *d, generator=g)
        targets: list[float | int] = [0, 1, 0, 1]
        queries: object = torch.rand(3, *d, generator=g)
    elif model.config.kind == "classification":
        x = torch.rand(6, d[0], generator=g).tolist()
        targets = [0, 1, 2, 0, 1, 2]
        queries = torch.rand(2, d[0], generator=g).tolist()
    else:
        x, targets, queries = SUPPORT[0], SUPPORT[1], QUERIES
    if isinstance(x, torch.Tensor):  # as service.requests makes an image job
        job = AdaptJob(model.version, x, targets, model.config.inner.steps, None)
    else:
        job = adapt_job(meta_models, name, x, targets)  # type: ignore[arg-type]
    there = remote.submit_adapt(job).result(10)
    here = local.submit_adapt(job).result(10)
    assert there.params == here.params
    assert (there.loss_before, there.loss_after, there.steps) == (
        here.loss_before,
        here.loss_after,
        here.steps,
    )
    predict = PredictJob(model.version, ("t", name, "uid-1"), queries, there.params)  # type: ignore[arg-type]
    assert remote.submit_predict(predict).result(10) == local.submit_predict(predict).result(10)


def test_a_miss_raises_not_cached_then_the_stored_params_are_cached_for_every_front(
    remote: RemoteEngine, meta_models: dict[str, MetaModel], socket_path: str
) -> None:
    job = adapt_job(meta_models, "sinusoid", *SUPPORT)
    adapted = remote.submit_adapt(job).result(10)
    key = ("t", "miss", "uid-2")
    ask = PredictJob("test-sinusoid", key, QUERIES)
    with pytest.raises(NotCached) as miss:
        remote.submit_predict(ask)
    first = remote.submit_predict(miss.value.loaded(adapted.params)).result(10)
    hits = remote.stats().cache.hits
    assert remote.submit_predict(ask).result(10) == first  # cached by the miss's load
    assert remote.stats().cache.hits == hits + 1
    other = front(meta_models, socket_path)  # a second front: one cache per device
    try:
        assert other.submit_predict(ask).result(10) == first
        remote.forget("t", "miss")
        remote.ticket()  # a round trip: the forget is done (each front has its own link)
        with pytest.raises(NotCached):
            other.submit_predict(ask)
        key2 = ("t", "stored", "uid-3")
        assert remote.stored(adapted, key2)
        remote.ticket()  # a round trip: the engine process has read what was sent before
        assert other.submit_predict(PredictJob("test-sinusoid", key2, QUERIES)).result(10) == first
    finally:
        other.stop(5)


def test_an_event_loop_s_miss_fails_its_future_instead_of_waiting(
    remote: RemoteEngine,
) -> None:
    future = remote.submit_predict(
        PredictJob("test-sinusoid", ("t", "loop", "uid-4"), QUERIES), on_loop=True
    )
    assert isinstance(future.exception(10), NotCached)


def test_bulk_jobs_answer_one_by_one_with_their_own_misses_and_errors(
    remote: RemoteEngine, meta_models: dict[str, MetaModel]
) -> None:
    jobs = [
        adapt_job(meta_models, "sinusoid", SUPPORT[0], [y * s for y in SUPPORT[1]]) for s in (1, 2)
    ]
    adapted = [f.result(10) for f in remote.submit_adapt_many(jobs)]
    known = ("t", "bulk", "uid-5")
    remote.stored(adapted[0], known)
    futures = remote.submit_predict_many(
        [
            PredictJob("test-sinusoid", known, QUERIES),
            PredictJob("test-sinusoid", ("t", "bulk", "uid-6"), QUERIES),  # a miss
            PredictJob("test-sinusoid", ("t", "bulk", "uid-7"), QUERIES, WRONG),
            PredictJob("test-nothing", ("t", "bulk", "uid-8"), QUERIES, adapted[1].params),
        ]
    )
    assert all(f.done() for f in futures)
    assert len(futures[0].result()) == len(QUERIES)
    assert isinstance(futures[1].exception(), NotCached)
    assert isinstance(futures[2].exception(), ValueError)  # its type survives the trip
    assert isinstance(futures[3].exception(), KeyError)


def test_a_lost_engine_process_fails_jobs_with_503_and_its_successor_is_sent_the_models(
    meta_models: dict[str, MetaModel], process: EngineProcess, socket_path: str
) -> None:
    remote = front(meta_models, socket_path)
    try:
        process.stop()
        job = adapt_job(meta_models, "sinusoid", *SUPPORT)
        for _ in range(100):  # until the link has noticed
            if not remote.ready:
                break
            threading.Event().wait(0.02)
        assert not remote.ready
        with pytest.raises(Unavailable) as refused:
            remote.submit_adapt(job)
        assert refused.value.retry_after == 1.0
        successor = EngineProcess(socket_path)
        try:
            assert remote.wait_ready(10)
            assert remote.submit_adapt(job).result(10).steps == job.steps  # loaded again
            assert "test-sinusoid" in successor.engine.loaded()
        finally:
            successor.stop()
    finally:
        remote.stop(5)


def test_frames_read_whole_from_a_stream_cut_anywhere() -> None:
    frames = [wire.Frame({"op": "x", "n": i}, [bytes([i]) * (i * 37), b"ab"]) for i in range(1, 6)]
    data = b"".join(b"".join(bytes(b) for b in f.encode()) for f in frames)
    reader = wire.FrameReader()
    got = []
    for start in range(0, len(data), 13):  # a chunk boundary inside every part
        got += reader.feed(data[start : start + 13])
    assert [f.header["n"] for f in got] == [1, 2, 3, 4, 5]
    assert [bytes(f.blobs[0]) for f in got] == [bytes([i]) * (i * 37) for i in range(1, 6)]
    with pytest.raises(ConnectionError):
        wire.FrameReader().feed(wire.PREFIX.pack(wire.MAX_HEADER + 1, 0))


def test_a_frame_larger_than_the_socket_buffer_is_written_whole_on_a_non_blocking_socket() -> None:
    """A meta-model's load frame (megabytes) on the socket an event loop reads."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    data = bytes(range(256)) * (8 << 12)  # 8 MiB
    received = bytearray()

    def read() -> None:
        while len(received) < len(data):
            threading.Event().wait(0.001)  # a slow reader: the buffer fills
            received.extend(theirs.recv(1 << 16))

    reader = threading.Thread(target=read)
    reader.start()
    wire.write_all(ours, data)
    reader.join(30)
    assert bytes(received) == data
    ours.close()
    theirs.close()

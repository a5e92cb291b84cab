"""The text benchmark's pieces (``benchmarks/bench_text.py``): its sentences are distinct
and valid inputs, its requests are what the API accepts, and wrk replays its request
files in order with the key. Nothing here is timed."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from benchmarks import bench_text
from benchmarks.bench_text import MULTI, SHOTS, WAYS, Bodies, write_requests
from benchmarks.bench_text_engine import adapt_jobs
from benchmarks.sentences import INTENTS, Sentences
from benchmarks.serving import wrk
from models.checkpoint import MetaModel
from models.evaluate import ARTIFACTS
from service import requests
from service.api.schemas import AdaptRequest, PredictionRequest
from service.settings import Settings


def test_sentences_are_distinct_valid_texts_and_seeded() -> None:
    source = Sentences(seed=0)
    limit = Settings().max_text_chars
    taken = {intent: source.take(intent, 2000) for intent in INTENTS}
    every = [t for texts in taken.values() for t in texts]
    assert len(set(every)) == len(every) == 2000 * len(INTENTS)
    assert all(t.strip() == t and 0 < len(t) <= limit for t in every)
    assert not any("{" in t or "}" in t for t in every)  # every slot filled
    again = Sentences(seed=0)
    assert again.take("weather", 50) == taken["weather"][:50]
    assert Sentences(seed=1).take("weather", 50) != taken["weather"][:50]


def test_an_intent_refuses_to_repeat_itself_once_spent() -> None:
    source = Sentences()
    capacity = source.capacity("translate")
    assert capacity > 50_000  # headroom for a full run's new texts
    source.take("translate", capacity)
    with pytest.raises(RuntimeError, match="handed out"):
        source.take("translate", 1)


def test_an_adaptation_is_ten_intents_of_five_new_examples_the_service_accepts() -> None:
    bodies = Bodies(clients=4)
    path, body = bodies.adaptation()
    texts, labels = body["support"]["inputs"], body["support"]["targets"]
    assert path.startswith("/v1/clients/text-new-") and path.endswith("/adaptations")
    assert len(set(labels)) == WAYS and all(labels.count(lb) == SHOTS for lb in set(labels))
    assert len(set(texts)) == WAYS * SHOTS
    AdaptRequest.model_validate(body)
    intents = MetaModel.load(ARTIFACTS / bench_text.META_MODEL)
    valid = requests.adaptation(model=intents, settings=Settings(), inputs=texts, targets=labels)
    assert valid.job.inputs[: len(texts)] == tuple(texts)  # then the labels' names
    assert valid.labels is not None and sorted(map(str, valid.labels)) == sorted(set(labels))
    _, second = bodies.adaptation()
    assert not set(second["support"]["inputs"]) & set(texts)


def test_the_mixed_load_alternates_adaptations_and_predictions_of_seeded_clients() -> None:
    bodies = Bodies(clients=3)
    seeds = bodies.seeds()
    assert [p for p, _ in seeds] == [f"/v1/clients/text-{n}/adaptations" for n in range(3)]
    mixed = bodies.workload("mixed", 8)
    kinds = [path.rsplit("/", 1)[1] for path, _ in mixed]
    assert kinds == ["adaptations", "predictions"] * 4
    sizes = [len(body["inputs"]) for path, body in mixed if path.endswith("predictions")]
    assert sizes == [1, MULTI, 1, MULTI]
    for path, body in mixed[1::2]:
        assert path.split("/")[3] in {"text-0", "text-1", "text-2"}
        PredictionRequest.model_validate(body)


def test_the_request_file_holds_one_path_and_body_per_line(tmp_path: Path) -> None:
    posts = Bodies(clients=2).workload("mixed", 6)
    lines = write_requests(posts, tmp_path / "r.txt").read_text("utf-8").splitlines()
    assert [(p, json.loads(b)) for p, b in (line.split("\t", 1) for line in lines)] == posts


class Recorder(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    seen: ClassVar[list[tuple[str, str, bytes]]] = []  # (path, Authorization, body)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.seen.append((self.path, self.headers.get("Authorization", ""), body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def recorder() -> Iterator[str]:
    Recorder.seen = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            httpd.serve_forever(poll_interval=0.05)
        except BaseException as exc:  # recorded: a bare thread's exception is only a warning
            errors.append(exc)

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        thread.join()
        httpd.server_close()
    assert errors == []


@pytest.mark.skipif(shutil.which("wrk") is None, reason="wrk is not installed")
def test_wrk_replays_the_file_in_order_with_the_key(recorder: str, tmp_path: Path) -> None:
    posts = Bodies(clients=2).workload("mixed", 5)
    file = write_requests(posts, tmp_path / "r.txt")
    run = wrk(recorder, "replay.lua", 1, 1, "secret", REQUESTS=str(file))
    assert run.errors == 0
    seen = Recorder.seen
    assert len(seen) > len(posts)  # it went round again
    # wrk calls request() once before the run to check it, so the sending starts at line 2
    for i, (path, auth, body) in enumerate(seen[: 2 * len(posts)], start=1):
        want_path, want_body = posts[i % len(posts)]
        assert (path, auth, json.loads(body)) == (want_path, "Bearer secret", want_body)


def test_the_in_process_jobs_are_the_services_for_the_same_support_sets() -> None:
    intents = MetaModel.load(ARTIFACTS / bench_text.META_MODEL)
    jobs = adapt_jobs(intents, Sentences(seed=3), 2)
    same = Sentences(seed=3)  # the same choices and texts
    texts, labels = same.support(same.choose(WAYS), SHOTS)
    want = requests.adaptation(model=intents, settings=Settings(), inputs=texts, targets=labels)
    assert jobs[0].inputs == want.job.inputs
    assert (jobs[0].targets, jobs[0].steps, jobs[0].lr) == (
        want.job.targets,
        want.job.steps,
        want.job.lr,
    )
    new = WAYS * SHOTS  # the client's texts are new each time (the labels' names repeat)
    assert not set(jobs[0].inputs[:new]) & set(jobs[1].inputs[:new])

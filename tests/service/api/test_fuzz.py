"""schemathesis over every operation of the OpenAPI document, in process (ASGI), with API
keys required: valid and invalid requests per operation, then stateful runs that follow the
document's links (adapt -> predict -> history -> delete, service/api/links.py). Every answer
must be a documented status code, match its documented schema, and never be a 5xx.

The budget and the seed are fixed (derandomised: the same requests on every run). A longer
run: ``FASTADAPT_FUZZ_EXAMPLES=500 FASTADAPT_FUZZ_SEED=7 pytest tests/service/api/test_fuzz.py``.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import CheckFunction, not_a_server_error  # noqa: E402
from schemathesis.python import asgi  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.store import migrate  # noqa: E402
from service.store.session import connect  # noqa: E402
from service.usecases import keys  # noqa: E402
from tests.service.store_fixtures import BACKENDS, Databases  # noqa: E402

EXAMPLES = int(os.environ.get("FASTADAPT_FUZZ_EXAMPLES", "12"))  # per operation and mode
SEED = int(os.environ.get("FASTADAPT_FUZZ_SEED", "20261202"))
STATEFUL_RUNS = max(1, EXAMPLES)
STATEFUL_STEPS = 30  # room for the chain among 20-odd operations
CHECKS: list[CheckFunction] = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
]
SUPPORT = {  # 5 points: the shipped sinusoid was meta-trained for 5 to 20
    "inputs": [[-2.0], [-1.0], [0.5], [1.5], [3.0]],
    "targets": [-1.2, -0.6, 0.9, 1.0, 0.4],
}
QUERIES = [[0.25], [2.5]]
TENANT = "fuzz"


def budget(examples: int, **extra: Any) -> settings:
    return settings(
        max_examples=examples,
        derandomize=False,  # the fixed @seed below decides
        database=None,
        deadline=None,
        phases=[Phase.explicit, Phase.generate],  # no shrinking: report, don't minimise
        suppress_health_check=list(HealthCheck),
        print_blob=True,
        **extra,
    )


class Fuzzed:
    """The app under test, its keys and its schemathesis view."""

    def __init__(self, app: Any, admin: str, client: str) -> None:
        self.app = app
        self.admin = {"Authorization": f"Bearer {admin}"}
        self.client = {"Authorization": f"Bearer {client}"}
        self.schema = schemathesis.openapi.from_asgi("/openapi.json", app)
        self.statuses: Counter[tuple[str, int]] = Counter()


@pytest.fixture(scope="module", params=BACKENDS)
def fuzzed(
    request: pytest.FixtureRequest, databases: Databases, models_dir: Path
) -> Iterator[Fuzzed]:
    """A migrated database (SQLite, PostgreSQL), an admin and a client key of one tenant,
    and the app with keys required everywhere."""
    url = databases.new(request.param, request)
    migrate.upgrade(url)
    engine = connect(url)
    with Session(engine) as session:
        admin = keys.create(session=session, tenant_id=TENANT, scope="admin").token
        client = keys.create(session=session, tenant_id=TENANT, scope="client").token
        session.commit()
    engine.dispose()
    tmp = request.config._tmp_path_factory.mktemp("fuzz")  # type: ignore[attr-defined]
    app = create_app(
        Settings(
            data_dir=tmp,
            models_dir=models_dir,
            database_url=url,
            threads=1,
            auth="required",
            versions_kept=5,
        )
    )
    try:
        yield Fuzzed(app, admin, client)
    finally:
        asgi.shutdown_lifespans()  # the app's engine thread and database pool


def operations(fuzzed: Fuzzed) -> list[Any]:
    found = [result.ok() for result in fuzzed.schema.get_all_operations()]
    assert found, "no operations in the document"
    return found


def fuzz_each(
    fuzzed: Fuzzed, mode: GenerationMode, headers: dict[str, str], examples: int
) -> dict[str, str]:
    """Run ``examples`` cases per operation; the first failure of each operation."""
    failures: dict[str, str] = {}
    for operation in operations(fuzzed):
        label = operation.label

        @seed(SEED)
        @budget(examples)
        @given(case=operation.as_strategy(generation_mode=mode))
        def run(case: Any) -> None:
            response = case.call(headers=headers)
            fuzzed.statuses[(case.operation.label, response.status_code)] += 1
            case.validate_response(response, checks=CHECKS, headers=headers)

        try:
            run()
        except Unsatisfiable:  # negative mode: nothing in the operation to make invalid
            assert mode is GenerationMode.NEGATIVE, label
        except Exception as error:  # every operation runs; all failures are reported
            failures[label] = f"{type(error).__name__}: {error}"
    return failures


def report(fuzzed: Fuzzed, title: str) -> None:
    rows = sorted(fuzzed.statuses.items())
    print(f"\n{title}: {sum(n for _, n in rows)} requests")
    for (label, status), count in rows:
        print(f"  {status}  {count:5d}  {label}")
    fuzzed.statuses.clear()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
def test_every_operation_answers_as_documented(fuzzed: Fuzzed, mode: GenerationMode) -> None:
    examples = EXAMPLES if mode is GenerationMode.POSITIVE else max(1, EXAMPLES * 2 // 3)
    failures = fuzz_each(fuzzed, mode, fuzzed.admin, examples)
    report(fuzzed, f"{mode.value} cases, admin key")
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())


def test_a_client_key_and_no_key_are_answered_as_documented(fuzzed: Fuzzed) -> None:
    """403 on admin operations for a client key, 401 without a key: both documented."""
    failures = fuzz_each(fuzzed, GenerationMode.POSITIVE, fuzzed.client, max(2, EXAMPLES // 5))
    failures |= {
        f"{k} (no key)": v
        for k, v in fuzz_each(fuzzed, GenerationMode.POSITIVE, {}, max(1, EXAMPLES // 10)).items()
    }
    seen = {status for (_, status) in fuzzed.statuses}
    report(fuzzed, "client key and no key")
    assert not failures, "\n\n".join(f"{k}\n{v}" for k, v in failures.items())
    assert {401, 403} <= seen, seen


def test_the_document_links_adapt_to_predict_history_and_delete(fuzzed: Fuzzed) -> None:
    paths = fuzzed.app.openapi()["paths"]
    adapt = paths["/v1/clients/{client_id}/adaptations"]["post"]["responses"]["201"]["links"]
    ids = {name: link["operationId"] for name, link in adapt.items()}
    operation_ids = {
        (method, path): op["operationId"]
        for path, operations in paths.items()
        for method, op in operations.items()
    }
    assert ids["predict"] == operation_ids[("post", "/v1/clients/{client_id}/predictions")]
    assert ids["client"] == operation_ids[("get", "/v1/clients/{client_id}")]
    assert ids["versions"] == operation_ids[("get", "/v1/clients/{client_id}/versions")]
    assert ids["delete"] == operation_ids[("delete", "/v1/clients/{client_id}")]
    assert adapt["predict"]["parameters"] == {"client_id": "$response.body#/client_id"}


def test_stateful_chains_follow_the_links(fuzzed: Fuzzed) -> None:
    """adapt (a valid support set, so that it succeeds) -> predict, history, readapt,
    rollback, examples -> delete: each link followed, every answer as documented."""
    base = fuzzed.schema.as_state_machine()
    called: Counter[tuple[str, int]] = Counter()
    headers = fuzzed.admin

    class Machine(base):  # type: ignore[misc, valid-type]
        def before_call(self, case: Any) -> None:
            """Valid bodies for adapt and predict (random ones are 422, the cases above
            cover them), so that the chains reach the operations they link to."""
            case.headers = {**(case.headers or {}), **headers}
            if not isinstance(case.body, dict):
                return
            if case.operation.path.endswith("/adaptations"):
                case.body["meta_model"] = "sinusoid"
                case.body["support"] = SUPPORT
                for guarded in ("inner_steps", "inner_lr"):  # the artifact's own only
                    case.body.pop(guarded, None)
            elif case.operation.path.endswith("/predictions"):
                case.body["inputs"] = QUERIES

        def after_call(self, response: Any, case: Any) -> None:
            called[(f"{case.method} {case.operation.path}", response.status_code)] += 1

        def validate_response(self, response: Any, case: Any, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, headers=headers)

    Machine._hypothesis_internal_use_seed = SEED  # hypothesis' @seed, for state machines
    run: Callable[..., None] = Machine.run
    run(
        settings=budget(STATEFUL_RUNS, stateful_step_count=STATEFUL_STEPS),
    )
    fuzzed.statuses.update(called)
    report(fuzzed, "stateful")
    succeeded = {label for (label, status), _ in called.items() if status < 300}
    # the chain was walked: a version made, then followed up along its links (which
    # follow-ups a seeded run reaches depends on the 20-odd operations it picks among)
    assert "POST /v1/clients/{client_id}/adaptations" in succeeded, sorted(called.items())
    follow_ups = {
        "POST /v1/clients/{client_id}/predictions",
        "GET /v1/clients/{client_id}/predictions",
        "GET /v1/clients/{client_id}",
        "GET /v1/clients/{client_id}/versions",
        "DELETE /v1/clients/{client_id}",
    }
    assert len(follow_ups & succeeded) >= 2, sorted(called.items())

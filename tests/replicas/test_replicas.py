"""Two replicas on one PostgreSQL database: what one writes the other reads at once,
concurrent adaptations of one client number its versions without gap or duplicate, a key
revoked on one is refused on the other within the documented bound."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

from tests.live import Replica
from tests.replicas.conftest import Deployment, create_key
from tests.replicas.helpers import adapt, predict, versions

REVOCATION_BOUND_S = 5.0  # docs/keys-and-tenants.md: a revoked key is refused within 5 s


def test_a_version_made_on_a_is_read_and_predicted_on_b_at_once(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    with a.client(deployment.key) as on_a, b.client(deployment.key) as on_b:
        for seed in range(3):
            made = adapt(on_a, "ryw", seed)
            assert made.status_code == 201, made.text
            version = made.json()["version"]
            assert versions(on_b, "ryw")[-1] == version
            current = predict(on_b, "ryw")  # B's current version is A's new one
            assert current["version"] == version
            assert current["predictions"] == predict(on_a, "ryw", version)["predictions"]


def test_a_client_deleted_and_made_again_on_a_predicts_the_new_model_on_b(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    with a.client(deployment.key) as on_a, b.client(deployment.key) as on_b:
        assert adapt(on_a, "reborn", 1).status_code == 201
        old = predict(on_b, "reborn", 1)["predictions"]  # B has the old version 1 cached
        assert on_a.delete("/v1/clients/reborn").status_code == 204
        assert adapt(on_a, "reborn", 4).status_code == 201  # version 1 again, another model
        new = predict(on_a, "reborn", 1)["predictions"]
        assert new != old
        assert predict(on_b, "reborn", 1)["predictions"] == new
        assert predict(on_b, "reborn")["predictions"] == new


def test_60_concurrent_adaptations_of_one_client_over_two_replicas_make_versions_1_to_60(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    with (
        a.client(deployment.key) as on_a,
        b.client(deployment.key) as on_b,
        ThreadPoolExecutor(12) as pool,
    ):
        futures = [
            pool.submit(adapt, on_a if seed % 2 else on_b, "sixty", seed) for seed in range(60)
        ]
        responses = [future.result() for future in futures]
        assert [r.status_code for r in responses] == [201] * 60, [r.text for r in responses]
        assert sorted(r.json()["version"] for r in responses) == list(range(1, 61))
        assert versions(on_a, "sixty") == list(range(1, 61))
        assert predict(on_b, "sixty")["version"] == 60


def test_a_key_revoked_on_a_is_refused_on_b_within_the_documented_bound(
    pair: tuple[Replica, Replica], deployment: Deployment
) -> None:
    a, b = pair
    key_id, key = create_key(deployment.database_url, "client")
    with a.client(deployment.admin_key) as admin_on_a, b.client(key) as on_b:
        assert on_b.get("/v1/meta-models").status_code == 200  # B now trusts it (cached)
        assert admin_on_a.delete(f"/v1/keys/{key_id}").status_code == 204
        revoked = time.monotonic()
        while (response := on_b.get("/v1/meta-models")).status_code == 200:
            assert time.monotonic() - revoked < REVOCATION_BOUND_S, "still accepted on B"
            time.sleep(0.05)
        assert response.status_code == 401, response.text

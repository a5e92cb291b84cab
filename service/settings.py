"""The one settings object: ``FASTADAPT_*`` environment variables, validated at start-up.

There is no module-level instance; ``create_app`` and the CLI build one and pass it on.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Literal, Self

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

import models

MiB = 1024 * 1024


def packaged_models_dir() -> Path:
    """The artifacts that ship with the ``models`` package (``models/artifacts``)."""
    return Path(models.__file__).parent / "artifacts"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FASTADAPT_", extra="ignore")

    # -- storage -----------------------------------------------------------------------------
    data_dir: Path = Field(default=Path("data"), description="Where the default SQLite file lives.")
    database_url: str = Field(
        default="", description="SQLAlchemy URL; empty means sqlite:///<data_dir>/fastadapt.db."
    )
    models_dir: Path = Field(
        default_factory=packaged_models_dir,
        description="Directory of meta-model artifacts, one sub-directory each.",
    )

    versions_kept: int = Field(
        default=10,
        ge=1,
        description="Versions kept per client: older ones are deleted as new ones are stored "
        "(the current version is the newest, so it is never deleted).",
    )

    # -- meta-model registry -----------------------------------------------------------------
    meta_model_cache_bytes: int = Field(
        default=512 * MiB,
        ge=0,
        description="Weights of meta-model versions kept loaded (least recently used unloaded; "
        "the one in use always stays).",
    )
    promotion_refresh_s: float = Field(
        default=2.0,
        ge=0,
        description="How long a process trusts its view of promoted versions: a promotion on "
        "one replica reaches the others within this (0: read on every use).",
    )
    allow_model_upload: bool = Field(
        default=False,
        description="Enable POST /v1/meta-models (admin): artifacts uploaded over HTTP.",
    )
    max_model_upload_bytes: int = Field(
        default=64 * MiB, ge=1024, description="Largest body of POST /v1/meta-models, in bytes."
    )

    # -- serving -----------------------------------------------------------------------------
    host: str = Field(default="127.0.0.1", description="Interface `fastadapt serve` binds.")
    port: int = Field(default=8000, ge=1, le=65535, description="Port `fastadapt serve` binds.")
    device: str = Field(
        default="auto", description='Torch device: "auto" (cuda if present), "cpu", ...'
    )
    workers: int = Field(
        default=1,
        ge=1,
        le=64,
        description="HTTP front processes of `fastadapt serve` on its one port. 1: one "
        "process, the engine in it (the fastest on the CPU for small nets); more: that many "
        "fronts and one engine process that owns the device and batches across all of them "
        "(docs/deployment.md).",
    )
    engine_socket: str = Field(
        default="",
        description="The Unix socket of an engine process to use instead of an engine in "
        "this process (`fastadapt serve --workers N` sets it for its fronts).",
    )

    # -- request limits ----------------------------------------------------------------------
    max_support: int = Field(default=1000, ge=1, description="Most support points per adaptation.")
    max_predict_batch: int = Field(
        default=10000, ge=1, description="Most inputs per prediction call."
    )
    max_bulk: int = Field(
        default=256,
        ge=1,
        description="Most items (clients) in one bulk request (/v1/predictions:batch, "
        "/v1/adaptations:batch); a bulk prediction's inputs, all items together, stay within "
        "max_predict_batch.",
    )
    max_body_bytes: int = Field(
        default=4 * MiB, ge=1024, description="Largest request body, in bytes."
    )
    body_timeout_s: float = Field(
        default=30.0,
        gt=0,
        description="Longest a request body may take to arrive (408 and the connection closed).",
    )
    max_image_pixels: int = Field(
        default=4_000_000, ge=1, description="Most pixels in one uploaded image (413 above)."
    )
    min_inner_steps: int = Field(
        default=1, ge=1, description="Smallest inner_steps a request may ask."
    )
    max_text_chars: int = Field(
        default=2000,
        ge=1,
        description="Longest text input (characters) of a text meta-model; longer is refused "
        "(422). The encoder reads at most its pinned max_tokens of a text (256 word pieces "
        "for intents) and truncates the rest.",
    )
    max_inner_steps: int = Field(
        default=100, ge=1, description="Largest inner_steps a request may ask."
    )
    max_inner_lr: float = Field(
        default=10.0, gt=0, description="Largest inner_lr (it must be > 0)."
    )

    idempotency_ttl_s: float = Field(
        default=86400.0,
        gt=0,
        description="How long an Idempotency-Key replays the response of the request that "
        "made a version; after that the key may be used anew.",
    )

    # -- guardrails (README "Guardrails") ----------------------------------------------------
    allow_untrained: bool = Field(
        default=False,
        description="Accept support sizes and inner steps outside what a meta-model was "
        "meta-trained for (its trained_for), with warnings, instead of a 422.",
    )
    allow_divergent: bool = Field(
        default=False,
        description="Store an adaptation whose support loss ended higher than it started, "
        "flagged with a warning, instead of refusing it with a 422.",
    )

    # -- engine ------------------------------------------------------------------------------
    max_batch_size: int = Field(
        default=256, ge=1, description="Most jobs the engine runs as one batch (1: no batching)."
    )
    max_batch_delay_ms: float = Field(
        default=2.0, ge=0, description="How long a batch waits to fill."
    )
    queue_size: int = Field(
        default=1024, ge=1, description="Jobs waiting for the engine before 503."
    )
    cache_bytes: int = Field(
        default=256 * MiB, ge=0, description="Adapted parameters kept on device."
    )
    job_timeout_s: float = Field(
        default=30.0, gt=0, description="Longest a request waits for the engine."
    )
    threads: int = Field(default=1, ge=1, description="Torch intra-op threads of the engine.")
    embedding_cache_bytes: int = Field(
        default=64 * MiB,
        ge=0,
        description="Text embeddings kept in memory (by encoder and text), so texts seen "
        "before are not encoded again.",
    )
    encoder_half: bool = Field(
        default=True,
        description="Run a text meta-model's sentence encoder in half precision on CUDA "
        "(the CPU always runs float32).",
    )
    shutdown_timeout_s: int = Field(
        default=30,
        ge=0,
        description="On SIGTERM, how long requests in flight may take to finish, and then "
        "how long the engine may take to drain its queue.",
    )

    # -- keys and tenants --------------------------------------------------------------------
    auth: Literal["auto", "required"] = Field(
        default="auto",
        description='"auto": API keys on any bind address but loopback; "required": everywhere.',
    )
    auth_cache_s: float = Field(
        default=2.0,
        ge=0,
        le=4.0,
        description="How long a process trusts a key it has looked up (a revoked key is "
        "refused within this plus a request's time: at most 4, so within 5 s).",
    )
    rate_limit_rps: float = Field(
        default=0.0, ge=0, description="Requests per second per tenant and process (0: no limit)."
    )
    rate_limit_burst: int = Field(
        default=20, ge=1, description="Requests a tenant may make at once before the limit."
    )

    # -- observability -----------------------------------------------------------------------
    metrics: bool = Field(
        default=True, description="Serve GET /metrics (Prometheus) and count every request."
    )
    metrics_census_s: float = Field(
        default=10.0,
        ge=0,
        description="How long /metrics reuses its count of stored clients and versions.",
    )
    access_log: bool = Field(
        default=True,
        description="One JSON line per request on the `fastadapt.access` logger (stdout).",
    )

    # -- reconcile jobs ----------------------------------------------------------------------
    reconcile_rate: float = Field(
        default=10.0,
        ge=0,
        description="Most clients per second this process re-adapts for reconcile jobs, one "
        "at a time (0: this process takes no part in them).",
    )
    reconcile_poll_s: float = Field(
        default=1.0, gt=0, description="How often an idle process looks for reconcile work."
    )
    reconcile_lease_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a claim on a client lasts unless renewed: the clients of a "
        "killed process are taken over after this.",
    )
    reconcile_claim: int = Field(
        default=4, ge=1, le=100, description="Clients a process claims at a time."
    )

    @model_validator(mode="after")
    def _resolve(self) -> Self:
        if self.min_inner_steps > self.max_inner_steps:
            raise ValueError("min_inner_steps must not exceed max_inner_steps")
        self.data_dir = self.data_dir.expanduser().resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'fastadapt.db'}"
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def auth_required(self) -> bool:
        """Whether requests need an API key: always with ``auth="required"``, and with
        ``"auto"`` unless the server binds a loopback address (never off on a public one)."""
        return self.auth == "required" or not is_loopback(self.host)


def is_loopback(host: str) -> bool:
    """``127.0.0.0/8``, ``::1`` or ``localhost``; anything else (``0.0.0.0``, ``::``, a
    name, a LAN address) may be reachable from elsewhere."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False

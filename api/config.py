"""One Settings object, read once from the environment (prefix ``ORCA_``) and ``.env``."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

GiB = 1024**3


class Settings(BaseSettings):
    """Service configuration. Every path, URL and limit lives here, nowhere else."""

    model_config = SettingsConfigDict(env_prefix="ORCA_", env_file=".env", extra="ignore")

    # Where the embedded default keeps everything (SQLite file, broker file, blobs, checkpoints).
    data_dir: Path = Field(default=Path("var"), description="root of local state")
    # Empty means the embedded default under data_dir: SQLite for state, SQLite broker for Celery.
    database_url: str = ""
    broker_url: str = ""
    storage_dir: Path | None = None  # default: data_dir / "storage"

    # Directories a task spec may name as a local backbone (`backbone: "<dir>"`, `hf:<dir>`, ...).
    model_dirs: list[Path] = Field(default_factory=list)
    # Source-proxy feature cache (per backbone and proxy).
    proxy_cache_dir: Path | None = None  # default: data_dir / "proxy-cache"

    # Upload limits (SPEC §3 defaults).
    max_upload_bytes: int = 2 * GiB
    max_decompressed_bytes: int = 4 * GiB
    max_npz_members: int = 64
    max_csv_rows: int = 5_000_000
    max_csv_columns: int = 100_000
    # Uploads validated at once by one API process; later ones wait their turn, so concurrent
    # uploads do not multiply the validator's memory.
    max_concurrent_validations: int = Field(default=2, ge=1)
    # Temp upload files older than this are removed when the API starts (those of a crashed
    # API process on this host are removed at once).
    stale_upload_max_age_seconds: float = 24 * 3600.0

    # Per-tenant limits.
    max_concurrent_jobs_per_tenant: int = 4
    max_storage_bytes_per_tenant: int = 50 * GiB
    predict_rate_per_minute: int = 6000

    # Prediction serving.
    predict_cache_size: int = 4
    predict_batch_window_ms: float = 5.0
    predict_max_batch: int = 64
    predict_max_inputs: int = 4096

    # Workers.
    worker_heartbeat_seconds: float = 10.0
    worker_lost_after_seconds: float = 120.0
    job_max_attempts: int = 3
    # A job queued at least this long while its broker queue holds no message at all is sent
    # again: a broker without persistence (a restarted Redis) forgets queued messages.
    queued_resend_after_seconds: float = 120.0

    # Largest JSON or .npy body accepted by POST /v1/models/{id}/predict.
    max_predict_body_bytes: int = 64 * 1024**2
    # Device the API process runs predictions on ("cpu", "cuda", "cuda:1").
    predict_device: str = "cpu"

    # Queue routing: how long the "is any worker listening on gpu?" answer is cached, and how
    # long the broadcast that asks it may take; how long a broker connection attempt may take.
    queue_inspect_ttl_seconds: float = 30.0
    queue_inspect_timeout_seconds: float = 0.5
    broker_timeout_seconds: float = 2.0
    # Retry-After sent with 429 when a tenant already runs its maximum of concurrent jobs.
    job_limit_retry_after_seconds: int = 30

    # How often an SSE event stream polls the database for new job events.
    events_poll_seconds: float = 0.5

    # The port /metrics is also served on; None = only on the main app.
    metrics_port: int | None = None

    @field_validator("model_dirs", mode="before")
    @classmethod
    def _split_paths(cls, value: object) -> object:
        # Accept "a:b" or "a,b" from the environment as well as a JSON list.
        if isinstance(value, str):
            parts = [p for chunk in value.split(",") for p in chunk.split(":")]
            return [Path(p) for p in parts if p.strip()]
        return value

    @property
    def resolved_database_url(self) -> str:
        if self.database_url:
            return self.database_url
        return f"sqlite:///{(self.data_dir / 'orca.db').resolve()}"

    @property
    def resolved_broker_url(self) -> str:
        if self.broker_url:
            return self.broker_url
        return f"sqla+sqlite:///{(self.data_dir / 'broker.db').resolve()}"

    @property
    def resolved_storage_dir(self) -> Path:
        return (self.storage_dir or self.data_dir / "storage").resolve()

    @property
    def resolved_proxy_cache_dir(self) -> Path:
        return (self.proxy_cache_dir or self.data_dir / "proxy-cache").resolve()


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (tests clear the cache to change them)."""
    return Settings()

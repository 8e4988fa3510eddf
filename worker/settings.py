"""The one settings object of the service, read once from the environment (prefix ``UNLEARND_``)."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="UNLEARND_", env_file=".env", extra="ignore")

    # Embedded default: SQLite, a local model store, an in-process worker.
    database_url: str = "sqlite:///var/unlearnd.db"
    store_dir: Path = Path("var/models")
    broker_url: str | None = None  # e.g. redis://127.0.0.1:6379/0; None = in-process worker
    result_backend: str | None = None

    model_name: str = "indoor-mtl"
    dataset: str = "indoor"
    n_train: int = 128
    n_test: int = 48
    image_height: int = 48
    image_width: int = 64
    # ~1 minute on 2 CPU cores and long enough that the model memorises its training data
    # (membership AUC 0.83-0.97 per task), so the audit's MIA numbers mean something.
    train_epochs: int = 60
    model_width: int = 16  # encoder base width and head width of a first model (tests use a tinier one)
    seed: int = 0

    method: str = "interference_aware"
    method_config: dict = {}  # the method's hyper-parameters over its defaults, JSON in UNLEARND_METHOD_CONFIG
    # interference_aware: calibrate where forgotten cells should land with shadow models, once per
    # model (stored next to its versions; (1 + tasks) x 4 trainings of the first version's recipe;
    # '{"shadow_folds": 2}' in UNLEARND_METHOD_CONFIG trains half as many, which at 795 scenes put
    # partial erasure within 0.03 of retrained models; '{"shadow_folds": 8, "shadow_trained_folds": 1}'
    # trains 1 + tasks and left it ~0.09 low: benchmarks/README.md, "A calibration of fewer shadows")
    calibrate_shadows: bool = False
    device: str = "auto"  # auto = CUDA when present
    # CPU threads torch may use in a job; None = torch's default. On a small shared CPU
    # (API, relay and worker in one process) oversubscribed threads slow jobs down many times.
    torch_threads: int | None = None
    job_time_limit_s: int = 3600
    stale_after_s: int = 600  # the sweeper re-enqueues work untouched for this long
    max_job_attempts: int = 3  # claims of one job before it is failed (its worker keeps dying: a poison job)
    relay_interval_s: float = 1.0

    background: bool = True  # the API process runs the outbox relay (and, without a broker, the in-process worker)
    host: str = "127.0.0.1"
    port: int = 8000


@lru_cache
def get_settings() -> Settings:
    return Settings()

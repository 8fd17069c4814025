"""Every setting of a vbs deployment, read from the environment in this one module.

``Settings()`` reads ``VBS_*`` variables (and the few standard ones vbs honours, such as
``CUDA_VISIBLE_DEVICES``) into one typed object that the resources, the API server and the CLI
receive; nothing else reads ``os.environ``. Secrets are ``SecretStr``: their repr is masked, so
they never reach a log line or an error message by accident, and code that needs the value asks
for it with ``get_secret_value()`` where it uses it.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit, urlunsplit

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

MB = 1024 * 1024

# Environment variables whose values are secrets: Dagster resources get them as ``dg.EnvVar``
# (resolved in the run, never shown in the UI), plain processes as resolved values.
SECRET_VARIABLES = {
    "webhook_secret": "VBS_WEBHOOK_SECRET",
    "catalog_url": "VBS_CATALOG_URL",
    "dagster_storage_url": "VBS_DAGSTER_STORAGE_URL",
    "sentry_dsn": "VBS_SENTRY_DSN",
    "engine_api_key": "VBS_ENGINE_API_KEY",
    "label_studio_token": "VBS_LABEL_STUDIO_TOKEN",
}


class SettingsError(ValueError):
    """A setting is missing, malformed or unsafe; the message names the variable."""


def _split_commas(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",")]
    return value


def is_loopback(host: str) -> bool:
    """True for names that only this machine can reach (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host.lower() in ("localhost", "localhost."):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def redact_url(url: str) -> str:
    """``url`` without user, password and query: safe for logs and error messages."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparseable URL>"
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


def database_url(url: str) -> str:
    """A SQLAlchemy URL as vbs opens it: ``postgresql://`` and ``postgres://`` use psycopg2, the
    driver vbs installs (SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3, which is not
    installed, and Dagster's ``postgres_db`` block fails the same way)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError("not a database URL (scheme://...)")
    if scheme in ("postgres", "postgresql"):
        return f"postgresql+psycopg2://{rest}"
    return url


class Settings(BaseSettings):
    """The deployment's settings; see the README's configuration table."""

    model_config = SettingsConfigDict(
        env_prefix="VBS_", extra="ignore", frozen=True, populate_by_name=True
    )

    home: Path = Field(default=Path(".vbs"), description="State: bucket, catalog, Dagster home.")
    bucket_url: str | None = Field(default=None, description="fsspec URL; $VBS_HOME/bucket.")
    catalog_url: SecretStr | None = Field(
        default=None, description="SQLAlchemy URL; sqlite:///$VBS_HOME/catalog.db."
    )

    # ---- engine -------------------------------------------------------------------------
    model: str | None = Field(default=None, description="Model folder; the prepared SmolLM2.")
    served_model_name: str = "SmolLM2-135M-Instruct"
    embedding_model: str | None = Field(
        default=None, description="Embedding model folder; the packaged all-MiniLM-L6-v2."
    )
    embedding_served_name: str = "all-MiniLM-L6-v2"
    dtype: str = "auto"
    max_model_len: int = Field(default=2048, ge=16)
    gpu_memory_utilization: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="The share of each GPU that vbs's vLLM engines take together: the chat "
        "engine (a run's, or each server replica's) gets it less the embedding engine's part.",
    )
    embedding_gpu_memory_utilization: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="The embedding engine's part of VBS_GPU_MEMORY_UTILIZATION: it starts in the "
        "run beside a warm server on the same GPU, and vLLM refuses a share the GPU has not free.",
    )
    tensor_parallel_size: int = Field(default=1, ge=1)
    cpu_kvcache_gib: int = Field(default=4, ge=1)
    max_lora_rank: int = Field(
        default=64, ge=1, le=512, description="The highest LoRA rank an adapter may have."
    )
    max_loras: int = Field(default=4, ge=1, description="Adapters in one engine step at once.")
    max_cpu_loras: int | None = Field(
        default=None, ge=1, description="Adapters kept loaded in memory; all of a run's if unset."
    )
    trust_request_chat_template: bool = Field(
        default=False,
        description="Let a request replace the model's chat template (vLLM's "
        "--trust-request-chat-template); off, such requests get an error line.",
    )
    tool_call_parser: str | None = Field(
        default=None,
        description="vLLM's tool-call parser for the base model (e.g. hermes); without one a "
        "request that may call a tool gets an error line naming tool_choice.",
    )
    reasoning_parser: str | None = Field(
        default=None,
        description="vLLM's reasoning parser for the base model (e.g. deepseek_r1, qwen3): "
        "puts the model's thinking in message.reasoning.",
    )
    lora_cpu_kernels: bool = Field(
        default=True,
        description="vbs's fused LoRA ops on vLLM's CPU build (two products per layer over "
        "every adapter of a step); false keeps vLLM's own.",
    )
    engine_threads: Annotated[int, Field(ge=1)] | Literal["auto"] = Field(
        default="auto",
        description="The CPU engine's OpenMP threads. auto: every core, less the cores other "
        "work at normal priority keeps busy, re-measured every second while the in-process "
        "engine runs; a number: that many, fixed.",
    )
    engine_follow_load: bool = Field(
        default=False,
        description="Set by `vbs engine serve` for its CPU servers when VBS_ENGINE_THREADS is "
        "auto: the server's threads follow the machine's load as the in-process engine's do.",
    )
    cuda_visible_devices: str | None = Field(
        default=None, validation_alias=AliasChoices("CUDA_VISIBLE_DEVICES")
    )

    # ---- engine: server mode ------------------------------------------------------------
    engine: Literal["in_process", "server"] = Field(
        default="server",
        description="server (default): runs send requests to long-lived vLLM servers, warm "
        "between batches; in_process: vLLM inside each run, started by it.",
    )
    engine_url: str | None = Field(
        default=None,
        description="The vLLM server (server mode); unset, `vbs serve` starts one on "
        "VBS_ENGINE_HOST:VBS_ENGINE_PORT.",
    )
    engine_host: str = "127.0.0.1"
    engine_lora: Literal["auto", "on", "off"] = Field(
        default="on",
        description="LoRA on the engine server: on (default), so that an adapter deployed later "
        "is served without a restart; auto turns it on only when adapters are registered at its "
        "start.",
    )
    engine_port: int = Field(
        default=8100,
        ge=1,
        le=65535,
        description="The engine server's port; with replicas, vLLM's router there, the replicas "
        "on the next ports (VBS_ENGINE_PORT+1 ... +N) and the router's metrics after them.",
    )
    engine_replicas: int = Field(
        default=1,
        ge=1,
        le=64,
        description="vLLM servers `vbs serve` (and `vbs engine serve`) starts; above 1, behind "
        "vLLM's router (vllm-router) on VBS_ENGINE_PORT.",
    )
    engine_router_policy: Literal[
        "round_robin", "power_of_two", "cache_aware", "consistent_hash", "random"
    ] = Field(
        default="round_robin",
        description="The router's policy (vllm-router --policy). round_robin spreads one "
        "model's batch over every replica and retries a dead replica's requests on another.",
    )
    engine_api_key: SecretStr | None = Field(
        default=None, description="The server's API key (vLLM's --api-key), if it has one."
    )
    engine_concurrency: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Requests in flight to each engine server (replica) at once: at least "
        "its max_num_seqs, or it idles between waves.",
    )
    engine_timeout_s: float = Field(
        default=600, gt=0, description="Longest wait for one response from the server."
    )
    engine_retry_s: float = Field(
        default=120,
        ge=0,
        description="How long a request is retried while the server is unreachable or "
        "answers 5xx, before the run steps back.",
    )
    engine_step_retries: int = Field(
        default=10, ge=0, description="Times a run retries its step after the server stayed away."
    )
    engine_step_retry_wait_s: float = Field(default=30, ge=0)

    # ---- curation -----------------------------------------------------------------------
    conquest_types_dir: Path | None = Field(
        default=None,
        description="The folder of conquest type files (YAML or JSON); the shipped "
        "conquest_types/ if unset.",
    )

    gold_min_rating: int = Field(
        default=4,
        ge=1,
        le=5,
        description="A rating at or above this makes a conquest gold (a VICTORY), like a gold "
        "star; a rating of 2 or less is a DEFEAT.",
    )
    dataset_eval_fraction: float = Field(
        default=0.1,
        ge=0,
        lt=1,
        description="The share of a curated dataset's distinct prompts held out for eval "
        "(by hash: a prompt keeps its split across versions).",
    )
    dataset_min_examples: int = Field(
        default=10,
        ge=0,
        description="The curated_dataset check min_examples fails (and blocks training) "
        "below this many examples.",
    )

    trainer_backend: str = Field(
        default="unsloth",
        description="Training backend of a job that names none (`vbs finetune backends`).",
    )
    training_backend_modules: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More training backend modules to import (comma-separated Python module "
        "names); an installed package's `vbs.training_backends` entry points are found alone.",
    )
    trainer_threads: int = Field(
        default=0, ge=0, description="Torch CPU threads in training (0: torch's own choice)."
    )
    retrain_cron: str = Field(
        default="0 3 * * 1", description="When the retraining schedule looks (weekly)."
    )
    retrain_min_new_gold: int = Field(
        default=20,
        ge=1,
        description="Retrain a type once its gold conquests hold this many beyond the deployed "
        "model's dataset version.",
    )
    retrain_schedule_on: bool = Field(
        default=False, description="Start the retraining schedule running (off in development)."
    )

    label_studio_url: str | None = Field(
        default=None,
        description="A Label Studio of your own; unset, `vbs serve` starts one on "
        "VBS_LABEL_STUDIO_HOST:VBS_LABEL_STUDIO_PORT.",
    )
    label_studio_host: str = Field(default="127.0.0.1", description="Where the local one listens.")
    label_studio_port: int = Field(default=8080, ge=1, le=65535)
    label_studio_token: SecretStr | None = Field(
        default=None,
        description="Label Studio's API token; unset, one is generated once into "
        "$VBS_HOME/label-studio/token (mode 600) for the local one's admin user.",
    )
    label_studio_start: bool = Field(
        default=True, description="Let `vbs serve` start the local Label Studio."
    )
    label_studio_bin: Path | None = Field(
        default=None,
        description="The label-studio command; the project's .venv-label-studio if unset.",
    )

    # ---- Dagster ------------------------------------------------------------------------
    dagster_host: str = "127.0.0.1"
    dagster_port: int = Field(default=3000, ge=1, le=65535)
    dagster_url: SecretStr | None = Field(
        default=None, description="Where the API launches runs (GraphQL); set by `vbs serve`."
    )
    code_server_host: str = Field(
        default="127.0.0.1",
        description="Where the code location's gRPC server (`dagster code-server start`) "
        "listens and is reached by the webserver and the daemon.",
    )
    code_server_port: int = Field(
        default=4266, ge=1, le=65535, description="The code location's gRPC server's port."
    )
    dagster_storage_url: SecretStr | None = Field(
        default=None,
        description="Dagster's run, event-log and schedule storage on PostgreSQL "
        "(postgresql+psycopg2://user:password@host:port/db); unset, SQLite under "
        "$VBS_HOME/dagster.",
    )
    dagster_yaml: Path | None = Field(
        default=None,
        description="An instance file of your own, used as it is (never rewritten); unset, "
        "`vbs serve` writes $VBS_HOME/dagster/dagster.yaml from these settings.",
    )
    max_concurrent_runs: int = Field(
        default=4, ge=1, le=1000, description="Dagster runs at once (the run queue's limit)."
    )
    gpu_slots: int = Field(
        default=1,
        ge=1,
        le=1024,
        description="Runs holding the `gpu` pool at once: one per accelerator (or engine) a "
        "run may own.",
    )
    run_retries: int = Field(
        default=2, ge=1, le=10, description="Times Dagster retries a run whose process died."
    )

    # ---- API server ---------------------------------------------------------------------
    api_host: str = "127.0.0.1"
    api_port: int = Field(default=8000, ge=1, le=65535)
    api_keys: Annotated[list[SecretStr] | None, NoDecode] = Field(
        default=None, description="Comma-separated keys; unset means no authentication."
    )
    api_insecure_no_auth: bool = Field(
        default=False,
        description="Allow a non-loopback API host without keys (only behind an "
        "authenticating proxy).",
    )
    api_allowed_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra Host header names accepted when no keys are set.",
    )
    rate_limit: str | None = Field(
        default=None,
        description="Requests one API key may send, in the `limits` notation: '20/second', "
        "'20/second;600/minute'; over it, 429 with Retry-After. Unset, no limit.",
    )
    max_batches_in_flight: int | None = Field(
        default=None,
        ge=1,
        description="Unfinished batches one API key may have at once; a create over it is a "
        "429 with Retry-After. Unset, no limit.",
    )
    max_upload_bytes: int = Field(default=200 * MB, ge=1)
    max_json_bytes: int = Field(default=1 * MB, ge=1024)

    # ---- clients (CLI) ------------------------------------------------------------------
    api_url: str = "http://127.0.0.1:8000/v1"
    api_key: SecretStr | None = Field(
        default=None, description="The key the CLI sends; the first of VBS_API_KEYS if unset."
    )

    # ---- operations ---------------------------------------------------------------------
    log_format: Literal["text", "json"] = Field(
        default="text",
        description="json: one JSON object per log line from the API, Dagster's processes, the "
        "sensors and the runs.",
    )
    sentry_dsn: SecretStr | None = Field(
        default=None,
        description="Sentry's DSN: errors and error-level logs of the API, the sensors and the "
        "runs are sent there, secrets scrubbed. Unset, nothing is sent.",
    )
    sentry_environment: str | None = Field(
        default=None, description="Sentry's environment name (Sentry's default: production)."
    )

    # ---- webhooks -----------------------------------------------------------------------
    webhook_urls: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: SecretStr | None = None
    webhook_retry_hours: float = Field(
        default=72.0, gt=0, le=24 * 30, description="How long an event is retried (OpenAI: 72)."
    )
    webhook_max_backoff_s: float = Field(
        default=3600.0, ge=1, le=24 * 3600, description="The longest wait between two rounds."
    )
    webhook_timeout_s: float = Field(default=10.0, gt=0, le=120, description="One try's timeout.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _keys(cls, value: Any) -> Any:
        if value is None:
            return None
        keys = _split_commas(value)
        if isinstance(keys, list) and any(not str(k) for k in keys):
            raise ValueError(
                "VBS_API_KEYS holds an empty key: give comma-separated keys, or unset it "
                "to run without authentication on loopback"
            )
        return keys

    @field_validator("webhook_urls", "api_allowed_hosts", "training_backend_modules", mode="before")
    @classmethod
    def _comma_list(cls, value: Any) -> Any:
        return [v for v in _split_commas(value) if v] if value is not None else []

    @field_validator("webhook_urls")
    @classmethod
    def _http_urls(cls, value: list[str]) -> list[str]:
        for url in value:
            if urlsplit(url).scheme not in ("http", "https"):
                raise ValueError(f"webhook URL {redact_url(url)!r} is not http(s)")
        return value

    @field_validator("engine_url")
    @classmethod
    def _engine_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        if urlsplit(value).scheme not in ("http", "https"):
            raise ValueError(f"engine URL {redact_url(value)!r} is not http(s)")
        # The server's root: requests go to <root>/v1/..., health to <root>/health.
        return value.rstrip("/").removesuffix("/v1")

    @field_validator("catalog_url", "dagster_storage_url")
    @classmethod
    def _database_url(cls, value: SecretStr | None) -> SecretStr | None:
        return None if value is None else SecretStr(database_url(value.get_secret_value()))

    @field_validator("dagster_storage_url")
    @classmethod
    def _postgres_only(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith("postgresql+psycopg2://"):
            raise ValueError("Dagster's storage is SQLite (unset) or a postgresql:// URL")
        return value

    @field_validator("rate_limit")
    @classmethod
    def _rates(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        from limits import parse_many

        try:
            if any(rate.amount < 1 for rate in parse_many(value)):
                raise ValueError
        except ValueError:
            raise ValueError("not a rate such as '20/second' or '20/second;600/minute'") from None
        return value

    @field_validator("home")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().absolute()

    @model_validator(mode="after")
    def _known_training_backend(self) -> Settings:
        """Backends register themselves (``vbs_resources.training``): the modules named here
        are imported first, then the default backend must be one of them all."""
        from vbs_resources.training import TrainingError, backend_names, load_backends

        try:
            load_backends(self.training_backend_modules)
        except TrainingError as exc:
            raise ValueError(f"VBS_TRAINING_BACKEND_MODULES: {exc}") from None
        if self.trainer_backend not in backend_names():
            raise ValueError(
                f"VBS_TRAINER_BACKEND={self.trainer_backend[:40]!r} is no training backend; "
                f"known: {', '.join(backend_names())}"
            )
        return self

    @model_validator(mode="after")
    def _safe_api_binding(self) -> Settings:
        if not self.api_keys and not is_loopback(self.api_host) and not self.api_insecure_no_auth:
            raise ValueError(
                f"the API would listen on {self.api_host} without authentication: set "
                "VBS_API_KEYS, or VBS_API_INSECURE_NO_AUTH=true behind an authenticating proxy"
            )
        if (
            not self.engine_api_key
            and not is_loopback(self.engine_host)
            and not self.api_insecure_no_auth
        ):
            raise ValueError(
                f"the engine server would listen on {self.engine_host} without a key: set "
                "VBS_ENGINE_API_KEY, or VBS_API_INSECURE_NO_AUTH=true behind a proxy"
            )
        if self.embedding_gpu_memory_utilization >= self.gpu_memory_utilization:
            raise ValueError(
                f"VBS_EMBEDDING_GPU_MEMORY_UTILIZATION={self.embedding_gpu_memory_utilization} "
                "is the embedding engine's part of VBS_GPU_MEMORY_UTILIZATION="
                f"{self.gpu_memory_utilization}: it must be smaller, leaving the chat engine room"
            )
        if self.engine_replicas > 1 and self.engine_port + self.engine_replicas + 1 > 65535:
            raise ValueError(
                f"VBS_ENGINE_PORT={self.engine_port} leaves no room for "
                f"VBS_ENGINE_REPLICAS={self.engine_replicas} replicas on the ports after it"
            )
        return self

    # ---- derived values -------------------------------------------------------------------

    @property
    def resolved_bucket_url(self) -> str:
        return self.bucket_url or str(self.home / "bucket")

    @property
    def resolved_catalog_url(self) -> str:
        if self.catalog_url is not None:
            return self.catalog_url.get_secret_value()
        return f"sqlite:///{self.home / 'catalog.db'}"

    @property
    def resolved_engine_url(self) -> str:
        """Where server mode sends requests: ``VBS_ENGINE_URL``, else the server `vbs serve`
        starts."""
        return self.engine_url or f"http://{self.engine_host}:{self.engine_port}"

    @property
    def engine_replica_urls(self) -> list[str]:
        """The vLLM servers `vbs serve` starts (server mode, no ``VBS_ENGINE_URL``): one on
        ``VBS_ENGINE_PORT``, or with replicas, one per port after it (the router on it)."""
        if self.engine_replicas == 1:
            return [self.resolved_engine_url]
        ports = range(self.engine_port + 1, self.engine_port + self.engine_replicas + 1)
        return [f"http://{self.engine_host}:{port}" for port in ports]

    @property
    def label_studio_home(self) -> Path:
        """The local Label Studio's data, its admin's token and password."""
        return self.home / "label-studio"

    @property
    def resolved_dagster_url(self) -> str:
        """Where runs are launched (GraphQL): ``VBS_DAGSTER_URL``, or the local webserver."""
        if self.dagster_url is not None:
            return self.dagster_url.get_secret_value()
        host = self.dagster_host
        reach = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
        return f"http://{reach}:{self.dagster_port}"

    @property
    def resolved_label_studio_url(self) -> str:
        return self.label_studio_url or f"http://{self.label_studio_host}:{self.label_studio_port}"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    @property
    def client_api_key(self) -> str | None:
        """The key the CLI sends: ``VBS_API_KEY``, else the first server key."""
        if self.api_key is not None:
            return self.api_key.get_secret_value()
        return self.api_keys[0].get_secret_value() if self.api_keys else None

    def with_overrides(self, **values: Any) -> Settings:
        """A copy with some settings replaced (command-line options win over the environment);
        validated again, so an override cannot make the settings unsafe."""
        return Settings.model_validate({**self.model_dump(), **values})

    def child_environment(self, **extra: str) -> dict[str, str]:
        """The environment for processes vbs starts (Dagster, the API server): this process's
        environment, with the settings that were resolved here made explicit, and caches kept
        inside ``VBS_HOME``."""
        env = dict(os.environ)
        env["VBS_HOME"] = str(self.home)
        env["DAGSTER_HOME"] = str(self.dagster_home)
        env.setdefault("HF_HUB_OFFLINE", "1")
        env.setdefault("VLLM_CACHE_ROOT", str(self.home / "cache" / "vllm"))
        env.setdefault("HF_HOME", str(self.home / "cache" / "hf"))
        env.setdefault("DAGSTER_DISABLE_TELEMETRY", "1")
        if self.log_format == "json":
            # vLLM's records go to the root logger (JSON) instead of a handler of its own.
            env.setdefault("VLLM_CONFIGURE_LOGGING", "0")
        if self.dagster_storage_url is not None:
            # As normalized here: Dagster reads the variable itself (dagster.yaml names it).
            env["VBS_DAGSTER_STORAGE_URL"] = self.dagster_storage_url.get_secret_value()
        env.update(extra)
        return env


def set_library_defaults(**values: str) -> None:
    """Variables that libraries read from the process environment at import (vLLM, torch,
    Hugging Face), set here unless the user set them: the one other place vbs touches the
    environment, and it only writes."""
    for name, value in values.items():
        os.environ.setdefault(name, value)


def cache_dir() -> Path:
    """``$VBS_HOME/cache`` of this process: where copies of the bucket's files are kept for
    libraries that read local paths (adapters for vLLM, a training job's dataset). Only the home
    setting is read (every setting is read in this module)."""
    return Path(os.environ.get("VBS_HOME", ".vbs")).expanduser().absolute() / "cache"


def load_settings(environ: dict[str, str] | None = None, **overrides: Any) -> Settings:
    """``Settings`` from ``environ`` (the process environment when None), raising
    ``SettingsError`` with the variable named when a value is wrong."""
    from pydantic import ValidationError

    try:
        if environ is None:
            return Settings(**overrides)
        # Read only from the given mapping: a test's or a child's environment.
        fields = {}
        for name, info in Settings.model_fields.items():
            alias = info.validation_alias
            keys = list(alias.choices) if isinstance(alias, AliasChoices) else []
            keys.append(f"VBS_{name.upper()}")
            for key in keys:
                if isinstance(key, str) and key in environ:
                    fields[name] = environ[key]
                    break
        return Settings.model_validate({**fields, **overrides})
    except ValidationError as exc:
        first = exc.errors()[0]
        if not first["loc"]:  # a check of several settings: its message names them
            raise SettingsError(first["msg"].removeprefix("Value error, ")) from None
        name = ".".join(str(p) for p in first["loc"])
        raise SettingsError(f"VBS_{name.upper()}: {first['msg']}") from None

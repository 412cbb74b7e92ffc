"""Fine-tuning job specs and objects, shaped like OpenAI's; Tuneforge's own knobs live in `method`."""

import re
from typing import Annotated, Any, Literal, Self, get_args

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from app.config import get_settings

TASKS = ("supervised", "dpo", "classification")
JOB_STATUSES = ("validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled")
ACTIVE_STATUSES = ("validating_files", "queued", "running", "paused")
# `auto` is resolved by the worker that runs the job: full if it fits its memory, else LoRA, else QLoRA.
PeftChoice = Literal[
    "auto",
    "lora",
    "dora",
    "qlora",
    "lora_8bit",
    "full",
    "freeze",
    "prefix_tuning",
    "prompt_tuning",
    "p_tuning",
    "ia3",
    "loha",
    "lokr",
    "llama_adapter",
]
PEFT_METHODS = get_args(PeftChoice)[1:]  # the methods themselves, without auto
LORA_FAMILY = ("lora", "dora", "qlora", "lora_8bit", "loha", "lokr")
QUANTIZED = ("qlora", "lora_8bit")
# The methods each task offers; supervised offers them all. DPO's reference model is the base with
# adapters disabled, which prompt-learning methods cannot provide; a new classification head trains
# alongside weight adapters, full or partial fine-tuning.
TASK_METHODS = {
    "supervised": PEFT_METHODS + ("auto",),
    "dpo": (*LORA_FAMILY, "full", "auto"),
    "classification": (*LORA_FAMILY, "full", "freeze", "auto"),
}
# PEFT's adaption prompt (LLaMA-Adapter) knows the attention of these architectures only.
LLAMA_ADAPTER_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")
# Base learning rates by method, the usual starting points: adapters learn fast, whole weights slowly,
# and virtual-token methods need larger steps still.
BASE_LEARNING_RATES = {
    **dict.fromkeys(LORA_FAMILY, 2e-4),
    "full": 2e-5,
    "freeze": 5e-5,
    "ia3": 3e-3,
    **dict.fromkeys(("prefix_tuning", "prompt_tuning", "p_tuning", "llama_adapter"), 3e-3),
}

# The optimizers of the QLoRA recipe and their usual neighbours (worker/training/optimizers.py maps each to
# transformers' `optim`). bitsandbytes pages its states between GPU and host memory with CUDA's unified
# memory; without CUDA it would quietly run the unpaged optimizer instead, so the paged ones are refused.
OptimizerChoice = Literal["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw_32bit", "adafactor"]
OPTIMIZERS = get_args(OptimizerChoice)
CUDA_ONLY_OPTIMIZERS = {"paged_adamw_8bit": "adamw_8bit", "paged_adamw_32bit": "adamw"}  # -> the unpaged one

Auto = Literal["auto"]
# OpenAI's bounds, so a spec OpenAI refuses is refused here too.
MAX_EPOCHS, MAX_BATCH_SIZE, MAX_BETA, MAX_SEED = 50, 256, 2.0, 2**31 - 1
# Ours: far above any sensible value, low enough that nothing downstream overflows or allocates wildly.
MAX_RANK, MAX_SEQ_LENGTH, MAX_VIRTUAL_TOKENS, MAX_ACCUMULATION = 1024, 131072, 1024, 1024


def _bounded_or_auto(value: int | str, low: int, high: int) -> int | str:
    in_range = isinstance(value, int) and not isinstance(value, bool) and low <= value <= high
    if value != "auto" and not in_range:
        raise ValueError(f"must be an integer from {low} to {high}, or 'auto'")
    return value


def _multiplier(value: float | str) -> float | str:
    if value != "auto" and (not isinstance(value, float | int) or not 0 < value <= 100):
        raise ValueError("must be a number in (0, 100] or 'auto'")
    return value


# OpenAI's three hyperparameters, checked alike in `method` and in the deprecated top-level block.
Epochs = Annotated[int | Auto, AfterValidator(lambda v: _bounded_or_auto(v, 1, MAX_EPOCHS))]
BatchSize = Annotated[int | Auto, AfterValidator(lambda v: _bounded_or_auto(v, 1, MAX_BATCH_SIZE))]
Multiplier = Annotated[float | Auto, AfterValidator(_multiplier)]


class TrainingHyperparameters(BaseModel):
    """Hyperparameters every task shares: OpenAI's three, plus the PEFT and sequence knobs."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Epochs = Field("auto", description="Passes over the training file; auto means 3.")
    batch_size: BatchSize = Field("auto", description="Examples per optimizer step; auto means 4.")
    learning_rate_multiplier: Multiplier = Field(
        "auto", description="Scales the method's base learning rate (2e-4 for LoRA, 2e-5 for full)."
    )
    learning_rate: float | None = Field(
        None, gt=0, le=1, description="Absolute learning rate; overrides the multiplier."
    )
    peft: PeftChoice = Field(
        "lora",
        description="The fine-tuning method: which weights train, and how. 'auto' picks full, LoRA or QLoRA "
        "by the worker's memory.",
    )
    lora_r: int = Field(8, ge=1, le=MAX_RANK, description="Rank of LoRA, DoRA, QLoRA, LoHa and LoKr updates.")
    lora_alpha: int = Field(
        16, ge=1, le=16 * MAX_RANK, description="LoRA scaling numerator (scale = alpha / r)."
    )
    lora_dropout: float = Field(0.05, description="Dropout on the LoRA path.")
    use_rslora: bool = Field(False, description="Rank-stabilised LoRA scaling (alpha / sqrt(r)).")
    num_virtual_tokens: int = Field(
        16, ge=1, le=MAX_VIRTUAL_TOKENS, description="Virtual tokens of prefix, prompt and p-tuning."
    )
    n_trainable_layers: int = Field(
        2,
        ge=1,
        le=MAX_RANK,
        description="freeze: top transformer blocks that train (at most the model's).",
    )
    train_head: bool = Field(True, description="freeze: whether the output head trains too.")
    target_modules: list[str] | Literal["all-linear"] | None = Field(
        None, description="Module names to adapt; None means the attention projections the model has."
    )
    max_seq_length: int = Field(
        512,
        ge=1,
        le=MAX_SEQ_LENGTH,
        description="Longer examples are truncated to this many tokens; at most the model's context.",
    )
    validation_split: float = Field(
        0.0,
        description="Without a validation_file, hold out this fraction of the training file for valid_loss.",
    )
    packing: bool = Field(False, description="Pack several short examples into each max_seq_length row.")
    padding_free: bool = Field(
        True,
        description="supervised: lay each batch's examples end to end instead of padding them (the same "
        "loss, less work); the worker pads anyway where that is not exact (prompt-learning methods, models "
        "whose attention cannot keep examples apart).",
    )
    train_on_inputs: bool = Field(
        False, description="Train on every token, prompts included, not only on completions."
    )
    gradient_checkpointing: bool | Auto = Field(
        "auto",
        description="Keep only each block's input through the forward pass and recompute the rest in the "
        "backward: less activation memory for one more forward pass a step. auto means on where the workers "
        "train on a GPU, off on a CPU (TUNEFORGE_WORKER_DEVICE), and is resolved when the job is created.",
    )
    gradient_accumulation_steps: int = Field(
        1, ge=1, le=MAX_ACCUMULATION, description="Micro-batches summed per optimizer step."
    )
    warmup_ratio: float = Field(0.0, description="Fraction of steps spent warming up the learning rate.")
    optimizer: OptimizerChoice = Field(
        "adamw",
        description="adamw (torch), adamw_8bit (bitsandbytes: 8-bit states), paged_adamw_8bit and "
        "paged_adamw_32bit (bitsandbytes, states paged to host memory under pressure; CUDA only), or "
        "adafactor (factored second moments, no first moment).",
    )
    checkpoint_every_steps: int | None = Field(
        None,
        ge=1,
        le=10**6,
        description="Checkpoint every N optimizer steps; None means once per epoch.",
    )

    @field_validator("validation_split")
    @classmethod
    def _split(cls, value: float) -> float:
        if not 0 <= value <= 0.5:
            raise ValueError("must be between 0 and 0.5")
        return value

    @field_validator("lora_dropout", "warmup_ratio")
    @classmethod
    def _fraction(cls, value: float) -> float:
        if not 0 <= value < 1:
            raise ValueError("must be in [0, 1)")
        return value

    @field_validator("target_modules")
    @classmethod
    def _non_empty_modules(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list) and (not value or not all(v.strip() for v in value)):
            raise ValueError("must be a non-empty list of module names or 'all-linear'")
        return value

    def resolved(self, device: Literal["cpu", "cuda"] | None = None) -> Self:
        """A copy with every 'auto' replaced by the value that will be used.

        With `peft: auto` the learning rate stays unset until the worker has picked the method.
        `gradient_checkpointing: auto` is what the workers' `device` does (on cuda only); without a device
        (an estimate, planned for a device of its own) it stays auto.
        """
        multiplier = 1.0 if self.learning_rate_multiplier == "auto" else float(self.learning_rate_multiplier)
        learning_rate = self.learning_rate
        if learning_rate is None and self.peft != "auto":
            learning_rate = BASE_LEARNING_RATES[self.peft] * multiplier
        return self.model_copy(
            update={
                "n_epochs": 3 if self.n_epochs == "auto" else self.n_epochs,
                "batch_size": 4 if self.batch_size == "auto" else self.batch_size,
                "learning_rate_multiplier": multiplier,
                "learning_rate": learning_rate,
            }
            | (
                {"gradient_checkpointing": device == "cuda"}
                if device and self.gradient_checkpointing == "auto"
                else {}
            )
        )


class SupervisedHyperparameters(TrainingHyperparameters):
    """Hyperparameters of a supervised (SFT) job."""

    liger_kernels: bool = Field(
        False,
        description="Liger's Triton kernels for the layers' RMSNorm, rotary embeddings and SwiGLU (CUDA "
        "only; the worker needs the liger-kernel package, which the GPU image installs).",
    )


class DpoHyperparameters(TrainingHyperparameters):
    """Hyperparameters of a DPO job: `beta` weighs the preference margin against staying near the base."""

    beta: float | Auto = Field("auto", description="DPO's KL weight; auto means 0.1.")

    @field_validator("beta")
    @classmethod
    def _beta(cls, value: float | str) -> float | str:
        if value != "auto" and (not isinstance(value, float | int) or not 0 < value <= MAX_BETA):
            raise ValueError(f"must be a number in (0, {MAX_BETA}] or 'auto'")
        return value

    def resolved(self, device: Literal["cpu", "cuda"] | None = None) -> Self:
        resolved = super().resolved(device)
        return resolved.model_copy(update={"beta": 0.1 if self.beta == "auto" else float(self.beta)})


class ClassificationHyperparameters(TrainingHyperparameters):
    """Hyperparameters of a sequence-classification job (a new head on the base model)."""

    max_seq_length: int = Field(
        128, ge=1, le=MAX_SEQ_LENGTH, description="Longer texts are truncated to this many tokens."
    )


class Supervised(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: SupervisedHyperparameters = Field(default_factory=SupervisedHyperparameters)


class Dpo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: DpoHyperparameters = Field(default_factory=DpoHyperparameters)


class Classification(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hyperparameters: ClassificationHyperparameters = Field(default_factory=ClassificationHyperparameters)


_TASK_BLOCKS: dict[str, type[BaseModel]] = {
    "supervised": Supervised,
    "dpo": Dpo,
    "classification": Classification,
}


class Method(BaseModel):
    """OpenAI's `method`: a `type` and that type's block of hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["supervised", "dpo", "classification"] = Field(
        "supervised",
        description="The task: supervised (SFT), dpo (preference pairs) or classification (text -> label).",
    )
    supervised: Supervised | None = None
    dpo: Dpo | None = None
    classification: Classification | None = None

    @model_validator(mode="after")
    def _one_block_of_its_type(self) -> "Method":
        for task in TASKS:
            if task != self.type and getattr(self, task) is not None:
                raise ValueError(f"method.{task} is given but method.type is '{self.type}'")
        if getattr(self, self.type) is None:
            setattr(self, self.type, _TASK_BLOCKS[self.type]())
        return self

    @property
    def hyperparameters(self) -> TrainingHyperparameters:
        return getattr(self, self.type).hyperparameters

    @hyperparameters.setter
    def hyperparameters(self, value: TrainingHyperparameters) -> None:
        getattr(self, self.type).hyperparameters = value


def hyperparameters_of(method: dict[str, Any]) -> dict[str, Any]:
    """The hyperparameters of a stored job's method, whatever its type."""
    return method[method["type"]]["hyperparameters"]


class LegacyHyperparameters(BaseModel):
    """OpenAI's deprecated top-level `hyperparameters`; folded into the method's hyperparameters."""

    model_config = ConfigDict(extra="forbid")

    n_epochs: Epochs | None = None
    batch_size: BatchSize | None = None
    learning_rate_multiplier: Multiplier | None = None


IntegrationType = Literal["wandb", "mlflow", "tensorboard"]
INTEGRATION_TYPES = get_args(IntegrationType)
# Far above the names, tags and server addresses people give runs; the bounds keep a job row small.
MAX_TRACKER_NAME, MAX_TRACKER_TAGS, MAX_TRACKER_URI = 128, 64, 2048
TrackerName = Annotated[str, Field(min_length=1, max_length=MAX_TRACKER_NAME)]


class WandbSettings(BaseModel):
    """OpenAI's `wandb` block. The API key is the worker's (WANDB_API_KEY), never the request's."""

    model_config = ConfigDict(extra="forbid")

    project: TrackerName = Field(description="The W&B project the run is created in.")
    name: TrackerName | None = Field(None, description="The run's display name; the job id if omitted.")
    entity: TrackerName | None = Field(
        None, description="The W&B team or user; the worker's API key's default entity if omitted."
    )
    tags: list[TrackerName] | None = Field(
        None, max_length=MAX_TRACKER_TAGS, description="Tags attached to the run."
    )


class MlflowSettings(BaseModel):
    """Tuneforge's `mlflow` block; credentials (MLFLOW_TRACKING_TOKEN, ...) are the worker's."""

    model_config = ConfigDict(extra="forbid")

    tracking_uri: str | None = Field(
        None,
        max_length=MAX_TRACKER_URI,
        description="An MLflow tracking server, http:// or https://; the worker's MLFLOW_TRACKING_URI if "
        "omitted.",
    )
    experiment_name: TrackerName | None = Field(
        None, description="The experiment the run goes in (created if missing); MLflow's default if omitted."
    )

    @field_validator("tracking_uri")
    @classmethod
    def _a_server(cls, value: str | None) -> str | None:
        # A local store (file:, sqlite:) would have a request write wherever the worker can, its own
        # database included: where a worker keeps runs on its disk is the operator's MLFLOW_TRACKING_URI.
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(
                "must be an http:// or https:// MLflow server; local stores are set on the worker"
            )
        return value


class Integration(BaseModel):
    """One experiment tracker a job reports to: a `type` and that type's block (tensorboard has none)."""

    model_config = ConfigDict(extra="forbid")

    type: IntegrationType = Field(
        description="wandb (Weights & Biases), mlflow, or tensorboard (event files shipped as a results "
        "file)."
    )
    wandb: WandbSettings | None = None
    mlflow: MlflowSettings | None = None

    @model_validator(mode="after")
    def _its_own_block(self) -> "Integration":
        for kind in ("wandb", "mlflow"):
            if kind != self.type and getattr(self, kind) is not None:
                raise ValueError(f"'{kind}' is given but type is '{self.type}'")
        if self.type != "tensorboard" and getattr(self, self.type) is None:
            raise ValueError(f"type '{self.type}' needs its '{self.type}' block")
        return self

    def as_stored(self) -> dict[str, Any]:
        """The integration as kept on the job and echoed back: its type and its own block only."""
        block = getattr(self, self.type, None)
        return {"type": self.type} | ({self.type: block.model_dump()} if block is not None else {})


_SUFFIX = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class Resources(BaseModel):
    """Tuneforge: what the job needs of the worker that runs it (app/jobs/routing.py)."""

    model_config = ConfigDict(extra="forbid")

    gpus: int = Field(
        1,
        ge=1,
        le=64,
        description="Devices the job trains on at once: DDP for adapter methods, FSDP for full and freeze "
        "fine-tuning. On CPU workers a device is a training process (gloo).",
    )
    gpu_kind: str | None = Field(
        None, max_length=100, description="Only workers with this GPU model (e.g. 'H100'), case-insensitive."
    )
    min_memory_gb: float | None = Field(None, gt=0, le=4096, description="Least memory per device (GiB).")


class JobCreate(BaseModel):
    """The body of POST /v1/fine_tuning/jobs."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(description="Base model id, as listed by GET /v1/models.")
    training_file: str = Field(description="Id of an uploaded file with purpose 'fine-tune'.")
    validation_file: str | None = Field(
        None, description="Optional file whose loss is reported at checkpoints."
    )
    suffix: str | None = Field(
        None, description="Up to 64 letters, digits, '-', '_' or '.', put in the model name."
    )
    seed: int | None = Field(
        None, ge=0, le=MAX_SEED, description="Seed for data order and initialisation; random if omitted."
    )
    metadata: dict[str, str] | None = Field(None, description="Up to 16 string pairs stored with the job.")
    hyperparameters: LegacyHyperparameters | None = Field(None, description="Deprecated; use method.")
    method: Method = Field(default_factory=Method, description="Task and hyperparameters.")
    integrations: list[Integration] | None = Field(
        None,
        max_length=len(INTEGRATION_TYPES),
        description="Experiment trackers the run reports to, each type at most once.",
    )
    priority: int = Field(
        0, ge=-100, le=100, description="Tuneforge: among queued jobs a worker can take, higher goes first."
    )
    resources: Resources | None = Field(
        None, description="Tuneforge: the devices the job needs; default one device of any kind."
    )

    @field_validator("suffix")
    @classmethod
    def _suffix_shape(cls, value: str | None) -> str | None:
        if value is not None and not _SUFFIX.match(value):
            raise ValueError("must be 1-64 letters, digits, '-', '_' or '.'")
        return value

    @field_validator("metadata")
    @classmethod
    def _metadata_size(cls, value: dict[str, str] | None) -> dict[str, str] | None:
        if value and (len(value) > 16 or any(len(k) > 64 or len(v) > 512 for k, v in value.items())):
            raise ValueError("at most 16 pairs, keys up to 64 and values up to 512 characters")
        return value

    @field_validator("integrations")
    @classmethod
    def _each_type_once(cls, value: list[Integration] | None) -> list[Integration] | None:
        types = [integration.type for integration in value or []]
        for later, kind in enumerate(types):
            if kind in types[:later]:
                first = types.index(kind)
                raise ValueError(
                    f"integrations[{first}] and integrations[{later}] are both type '{kind}'; "
                    "a run reports to each tracker once"
                )
        return value

    @model_validator(mode="after")
    def _fold_legacy_hyperparameters(self) -> "JobCreate":
        if self.hyperparameters:
            hp = self.method.hyperparameters
            given = self.hyperparameters.model_dump(exclude_none=True)
            self.method.hyperparameters = type(hp).model_validate(hp.model_dump() | given)
        return self

    def runs_on(self) -> tuple[str, str]:
        """The device the spec must run on, and how to name it: this deployment's workers' for a job."""
        device = get_settings().resolved_worker_device
        return device, f"this deployment's workers train on {device} (TUNEFORGE_WORKER_DEVICE)"

    @model_validator(mode="after")
    def _optimizer_runs_on_the_device(self) -> Self:
        optimizer = self.method.hyperparameters.optimizer
        if optimizer not in CUDA_ONLY_OPTIMIZERS:
            return self
        device, where = self.runs_on()
        if device != "cuda":
            message = (
                f"optimizer '{optimizer}' pages its states with CUDA, and {where}; use "
                f"'{CUDA_ONLY_OPTIMIZERS[optimizer]}', the same optimizer unpaged"
            )
            field = ("method", self.method.type, "hyperparameters", "optimizer")
            raise _field_error(field, optimizer, message)
        return self

    @model_validator(mode="after")
    def _several_devices_train_supervised_jobs(self) -> Self:
        if self.resources and self.resources.gpus > 1 and self.method.type != "supervised":
            message = (
                f"a job on several devices must be a supervised one for now; run this {self.method.type} job "
                "on one device (resources.gpus 1)"
            )
            raise _field_error(("resources", "gpus"), self.resources.gpus, message)
        return self

    @model_validator(mode="after")
    def _liger_kernels_run_on_the_device(self) -> Self:
        device, where = self.runs_on()
        if getattr(self.method.hyperparameters, "liger_kernels", False) and device != "cuda":
            message = f"liger_kernels are Triton kernels for CUDA, and {where}; leave liger_kernels off"
            field = ("method", self.method.type, "hyperparameters", "liger_kernels")
            raise _field_error(field, True, message)
        return self


def _field_error(loc: tuple[str, ...], value: object, message: str) -> ValidationError:
    """A validation error about the field at `loc`: a model validator's own errors name no field.

    pydantic prefixes `loc` with where the model sits (FastAPI's "body"), so the 400 names the field.
    """
    details = {"type": "value_error", "loc": loc, "input": value, "ctx": {"error": ValueError(message)}}
    return ValidationError.from_exception_data("JobCreate", [details])  # type: ignore[list-item]


class JobError(BaseModel):
    code: str
    message: str
    param: str | None = None


class JobProgress(BaseModel):
    """Tuneforge: how far a job's run has trained."""

    step: int = Field(description="The last step the run trained (the final one once the job has finished).")
    total_steps: int = Field(description="The optimizer steps the whole run takes.")


class JobPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job"] = "fine_tuning.job"
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    error: JobError | None
    hyperparameters: dict[str, Any]
    method: dict[str, Any]
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    seed: int
    suffix: str | None = None
    user_provided_suffix: str | None = None
    metadata: dict[str, str] | None
    integrations: list[dict[str, Any]] = Field(
        default_factory=list, description="The experiment trackers the job reports to, as given."
    )
    estimated_finish: int | None = Field(
        None,
        description="While the job runs: when it should finish (Unix seconds), at the pace of its current "
        "attempt; null otherwise.",
    )
    progress: JobProgress | None = Field(None, description="Tuneforge: null until the run's first step.")
    attempt: int = Field(0, description="Tuneforge: how many times a worker has claimed this job.")
    priority: int = Field(0, description="Tuneforge: higher runs first among queued jobs.")
    resources: Resources | None = Field(None, description="Tuneforge: the devices the job asked for.")


class JobsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobPublic]
    has_more: bool


class EventPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.event"] = "fine_tuning.job.event"
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None = None


class EventsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[EventPublic]
    has_more: bool


class StepMetricsPublic(BaseModel):
    """A job's metrics, one row per step; every row holds every column, null where a step has no value."""

    object: Literal["list"] = "list"
    columns: list[str] = Field(description="The metric names, in the order the CSV form puts them.")
    data: list[dict[str, float | int | None]] = Field(description="One row per step, ordered by step.")


class CheckpointPublic(BaseModel):
    id: str
    object: Literal["fine_tuning.job.checkpoint"] = "fine_tuning.job.checkpoint"
    created_at: int
    fine_tuned_model_checkpoint: str
    fine_tuning_job_id: str
    metrics: dict[str, Any]
    step_number: int


class CheckpointsPublic(BaseModel):
    object: Literal["list"] = "list"
    data: list[CheckpointPublic]
    has_more: bool
    first_id: str | None = None
    last_id: str | None = None

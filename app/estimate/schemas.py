"""The estimate's request (a job body plus what to compare) and its response."""

from typing import Literal

from pydantic import BaseModel, Field, field_validator

from app.jobs.schemas import PEFT_METHODS, JobCreate, PeftChoice

# Far beyond any device or label set; bounds keep the plan's arithmetic in finite floats.
MAX_GPU_MEMORY_GB = 1 << 20
MAX_NUM_LABELS = 1_000_000


class EstimateCreate(JobCreate):
    """The body of POST /v1/fine_tuning/estimate: a job body, plus the methods, device and memory to plan."""

    methods: list[PeftChoice] | Literal["all"] | None = Field(
        None,
        description="Methods to plan, or 'all' (every method the task offers and the model can take); "
        "default: the job's own peft, or full, lora and qlora when it is 'auto'.",
    )
    device: Literal["cuda", "cpu"] = Field(
        "cuda",
        description="cuda: bf16, mixed precision, gradient checkpointing; cpu: fp32, no checkpointing.",
    )
    gpu_memory_gb: float | None = Field(
        None,
        gt=0,
        le=MAX_GPU_MEMORY_GB,
        description="Memory to check each plan against (GiB); `fits` is null without it.",
    )
    num_labels: int | None = Field(
        None,
        ge=2,
        le=MAX_NUM_LABELS,
        description="classification: labels of the new head; default: counted in the training file.",
    )

    def runs_on(self) -> tuple[str, str]:
        """The device the plan is for, whatever the workers' is: one may plan a GPU run from a laptop."""
        return self.device, f"device is '{self.device}'"

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, value: list[str] | str | None) -> list[str] | str | None:
        if isinstance(value, list):
            if not value:
                raise ValueError("must list at least one method")
            if "auto" in value:
                raise ValueError(f"'auto' is a choice among methods, not one; list some of {PEFT_METHODS}")
        return list(dict.fromkeys(value)) if isinstance(value, list) else value


class MemoryBytes(BaseModel):
    weights: int
    gradients: int
    optimizer_states: int
    activations: int
    total: int


class MethodEstimate(BaseModel):
    peft: str
    trainable_parameters: int = Field(description="Exactly what the worker's PEFT build trains.")
    total_parameters: int = Field(description="All parameters of the wrapped model, quantized ones unpacked.")
    trainable_percent: float
    bytes: MemoryBytes
    gib: float = Field(description="bytes.total in GiB.")
    gpus: int = Field(1, description="The devices the job trains on (its resources.gpus).")
    per_gpu: MemoryBytes = Field(
        description="Each device's share: on GPUs, full and freeze fine-tuning shard weights, gradients and "
        "optimizer states across the devices (FSDP); adapter methods, and every method on CPU ranks, keep "
        "a whole copy on each (DDP). Activations are per device either way."
    )
    fits: bool | None = Field(description="Whether per_gpu.total fits gpu_memory_gb; null without it.")
    training_tokens: int
    estimated_seconds: float


class Assumption(BaseModel):
    name: str
    value: str
    why: str


class AutoChoice(BaseModel):
    chosen: str
    reason: str


class EstimatePublic(BaseModel):
    object: Literal["fine_tuning.estimate"] = "fine_tuning.estimate"
    model: str
    method_type: str
    batch_size: int
    max_seq_length: int
    n_epochs: int
    num_labels: int | None
    device: str
    gpu_memory_gb: float | None
    estimates: list[MethodEstimate]
    auto: AutoChoice | None = Field(
        None, description="With peft 'auto' and gpu_memory_gb: what a worker with that memory would pick."
    )
    assumptions: list[Assumption]

"""The estimate of a job body: validated like a job, planned per method from the base model's profile."""

import json
from typing import Any

from sqlalchemy.orm import Session

from app.errors import ApiError
from app.estimate import planner
from app.estimate.counts import PlanError
from app.estimate.schemas import (
    Assumption,
    AutoChoice,
    EstimateCreate,
    EstimatePublic,
    MemoryBytes,
    MethodEstimate,
)
from app.jobs import service as job_service
from app.jobs.schemas import TASK_METHODS
from app.models import service as model_service
from app.storage import get_store


def count_labels(path: Any) -> int:
    """Distinct labels of a classification file (one JSON object a line)."""
    labels = set()
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                labels.add(json.loads(line)["label"])
    return len(labels)


def _checked(
    session: Session, project: str, body: EstimateCreate, asked: list[str], *, strict: bool
) -> list[str]:
    """The asked methods, each checked as a job of that method would be.

    Strict (methods the caller named): an unfit method is a 400. Otherwise ('all', auto's candidates) a
    method the model cannot take is left out.
    """
    kept = []
    for method in asked:
        spec = body.model_copy(deep=True)
        spec.method.hyperparameters = spec.method.hyperparameters.model_copy(update={"peft": method})
        try:
            job_service.check_spec_against_model(session, project, spec)
        except ApiError as error:
            about_method = (error.param or "").endswith(".peft")
            if not about_method or strict:
                if about_method and isinstance(body.methods, list):
                    error.param = "methods"
                raise
            continue
        kept.append(method)
    return kept


def _methods(session: Session, project: str, body: EstimateCreate) -> tuple[list[str], list[str]]:
    """The methods to report, and auto's candidates (none unless peft is 'auto')."""
    task, peft = body.method.type, body.method.hyperparameters.peft
    auto = _checked(session, project, body, list(planner.AUTO_ORDER), strict=False) if peft == "auto" else []
    if body.methods == "all":
        offered = [m for m in TASK_METHODS[task] if m != "auto"]
        return _checked(session, project, body, offered, strict=False), auto
    if body.methods:
        return _checked(session, project, body, list(body.methods), strict=True), auto
    return (auto if peft == "auto" else [peft]), auto


def _plan_error(error: PlanError, task: str) -> ApiError:
    param = "model" if error.param == "model" else f"method.{task}.hyperparameters.{error.param}"
    return ApiError(400, str(error), param=param, code="invalid_value")


def estimate(session: Session, *, project: str, body: EstimateCreate) -> EstimatePublic:
    """Plan each asked method of this job body: counts, bytes, fit and time."""
    job_service.check_spec_against_model(session, project, body)
    methods, candidates = _methods(session, project, body)
    base = model_service.get_model(session, project=project, model_id=body.model, param="model")
    task = body.method.type
    training = job_service.training_data(
        session, project=project, file_id=body.training_file, param="training_file", task=task
    )
    hp: dict[str, Any] = body.method.hyperparameters.resolved().model_dump()
    num_labels = body.num_labels
    if task == "classification" and num_labels is None:
        num_labels = max(2, count_labels(get_store().local_path(training.storage_key)))
    tokens = planner.training_tokens(
        file_bytes=training.bytes,
        examples=training.example_count,
        max_seq_length=hp["max_seq_length"],
        n_epochs=hp["n_epochs"],
    )
    profile = base.profile or {}
    try:
        plans = {
            m: planner.plan_method(
                profile, hp | {"peft": m}, peft=m, device=body.device, task=task, num_labels=num_labels or 2
            )
            for m in dict.fromkeys([*methods, *candidates])
        }
    except PlanError as error:
        raise _plan_error(error, task) from error
    budget = int(body.gpu_memory_gb * 2**30) if body.gpu_memory_gb else None
    gpus = body.resources.gpus if body.resources else 1
    auto = None
    if candidates and budget:
        needs = {m: plans[m].total for m in candidates}
        chosen, reason = planner.choose_auto(needs, budget)
        auto = AutoChoice(chosen=chosen, reason=reason)
    return EstimatePublic(
        model=body.model,
        method_type=task,
        batch_size=hp["batch_size"],
        max_seq_length=hp["max_seq_length"],
        n_epochs=hp["n_epochs"],
        num_labels=num_labels,
        device=body.device,
        gpu_memory_gb=body.gpu_memory_gb,
        estimates=[
            _public(plans[m], tokens=tokens, device=body.device, budget=budget, gpus=gpus) for m in methods
        ],
        auto=auto,
        assumptions=[Assumption(**a) for a in planner.ASSUMPTIONS],
    )


def _public(
    plan: planner.Plan, *, tokens: int, device: planner.Device, budget: int | None, gpus: int
) -> MethodEstimate:
    counts, share = plan.counts, planner.per_device(plan, gpus, device)
    return MethodEstimate(
        peft=plan.peft,
        trainable_parameters=counts.trainable,
        total_parameters=counts.total,
        trainable_percent=round(100 * counts.trainable / max(counts.total, 1), 4),
        bytes=MemoryBytes(
            weights=plan.weights,
            gradients=plan.gradients,
            optimizer_states=plan.optimizer_states,
            activations=plan.activations,
            total=plan.total,
        ),
        gib=round(plan.total / 2**30, 3),
        gpus=gpus,
        per_gpu=MemoryBytes(**share),
        fits=None if budget is None else share["total"] <= budget,
        training_tokens=tokens,
        estimated_seconds=planner.estimated_seconds(plan, tokens=tokens, device=device),
    )

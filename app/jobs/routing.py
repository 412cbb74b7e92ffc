"""Where a job goes and which queued job a worker takes next.

- **Worker classes** (TUNEFORGE_WORKER_CLASSES): the kinds of worker a deployment runs, each consuming a
  queue of its own. A job is sent to the first class that fits its `resources` (device count, GPU kind,
  memory per device) and its memory plan; a job no class fits is refused with 400 (`route`).
- **Heartbeat rows**: each worker announces what it has (devices, kind, memory per device) in the
  `workers` table, renewed every heartbeat (`announce`). A job that fits no live worker of its class stays
  queued, with an event that says why (`live_misfit`); it starts when such a worker appears.
- **Fairness**: a message on a queue only wakes a worker; the worker then takes the best queued job of
  its queue that it can hold (`claimable`): highest `priority` first, then the project that started a
  job least recently (so one project's flood cannot starve another), then the oldest. A project with
  TUNEFORGE_PROJECT_MAX_RUNNING jobs running waits. The claim itself stays a conditional UPDATE, so two
  workers never run one job.
"""

import shutil
import subprocess
from datetime import timedelta
from functools import cache
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from app.config import WorkerClass, get_settings, gpu_present
from app.db.tables import Job, Worker
from app.db.time import db_now
from app.errors import ApiError

GIB = 2**30


@cache
def _nvidia_gpus() -> list[tuple[str, float]]:
    """(name, memory GiB) of each NVIDIA GPU nvidia-smi lists; none without it."""
    if not gpu_present() or shutil.which("nvidia-smi") is None:
        return []
    try:
        listed = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            timeout=20,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return []
    gpus = []
    for line in listed.splitlines():
        name, _, mib = line.rpartition(",")
        if name.strip() and mib.strip().isdigit():
            gpus.append((name.strip(), int(mib) / 1024))
    return gpus


def this_worker() -> dict[str, Any]:
    """What this host's worker offers a job: devices, their kind, memory per device (None: unknown)."""
    settings = get_settings()
    gpus = _nvidia_gpus()
    memory = settings.worker_memory_gb or (min(m for _, m in gpus) if gpus else None)
    return {
        "gpus": settings.worker_gpus or len(gpus) or 1,
        "gpu_kind": settings.worker_gpu_kind or (gpus[0][0] if gpus else "cpu"),
        "memory_gb": memory,
    }


def worker_classes() -> list[WorkerClass]:
    """The configured classes; by default one, the workers of the default queue, as this host sees them."""
    settings = get_settings()
    if settings.worker_classes:
        return settings.worker_classes
    return [WorkerClass(queue=settings.queue, gpus=this_worker()["gpus"])]


def misfit(resources: dict[str, Any], per_device_bytes: int | None, *, gpus: int, kind: str | None,
           memory_gb: float | None) -> str | None:  # fmt: skip
    """Why a worker with `gpus` devices of `kind` and `memory_gb` each cannot hold the job; None if it can."""
    needs = resources.get("gpus", 1)
    if needs > gpus:
        return f"it has {gpus} device(s), the job asks for {needs}"
    wanted = resources.get("gpu_kind")
    if wanted and (kind or "").lower() != wanted.lower():
        return f"its GPUs are {kind or 'of no stated kind'}, the job asks for {wanted}"
    least = resources.get("min_memory_gb")
    if least and (memory_gb is None or memory_gb < least):
        return f"it has {memory_gb or 'unstated'} GB per device, the job asks for {least}"
    if per_device_bytes and memory_gb is not None and per_device_bytes > memory_gb * GIB:
        return f"the job's memory plan needs {per_device_bytes / GIB:.1f} GB per device, it has {memory_gb}"
    return None


def route(resources: dict[str, Any], per_device_bytes: int | None) -> str:
    """The queue of the first worker class that fits the job, else a 400 that says what each lacks."""
    reasons = []
    for worker_class in worker_classes():
        problem = misfit(
            resources,
            per_device_bytes,
            gpus=worker_class.gpus,
            kind=worker_class.gpu_kind,
            memory_gb=worker_class.memory_gb,
        )
        if problem is None:
            return worker_class.queue
        reasons.append(f"'{worker_class.queue}': {problem}")
    raise ApiError(
        400,
        f"No kind of worker this deployment runs can hold this job ({'; '.join(reasons)}). Ask for fewer "
        "or other resources, or add a worker class that fits (TUNEFORGE_WORKER_CLASSES).",
        param="resources",
        code="no_worker_fits",
    )


def live_workers(session: Session, queue: str) -> list[Worker]:
    """Workers of `queue` that announced themselves within the last three heartbeats (at least 30 s)."""
    window = max(30.0, 3 * get_settings().heartbeat_seconds)
    rows = session.scalars(select(Worker).where(Worker.queue == queue, Worker.seen_at > db_now(-window)))
    return list(rows)


def live_misfit(session: Session, job: Job) -> str | None:
    """Why no live worker of the job's queue can take it now (an event for the user); None if one can."""
    workers = live_workers(session, job.queue or get_settings().queue)
    if not workers:
        return f"No worker of queue '{job.queue}' is running; the job starts when one does."
    problems = {
        w.id: misfit(job.resources or {}, None, gpus=w.gpus, kind=w.gpu_kind, memory_gb=w.memory_gb)
        for w in workers
    }
    if any(problem is None for problem in problems.values()):
        return None
    listed = "; ".join(f"{worker}: {problem}" for worker, problem in problems.items())
    return f"No running worker can hold this job yet ({listed}); it stays queued until one can."


def announce(session: Session, *, worker_id: str, queue: str, offer: dict[str, Any]) -> None:
    """Insert or renew this worker's heartbeat row."""
    row = session.get(Worker, worker_id)
    if row is None:
        row = Worker(id=worker_id, queue=queue, started_at=db_now())
        session.add(row)
    row.queue, row.seen_at = queue, db_now()
    row.gpus, row.gpu_kind, row.memory_gb = offer["gpus"], offer["gpu_kind"], offer["memory_gb"]


def retire(session: Session, *, worker_id: str) -> None:
    """A worker that stops removes its row; a killed one's row ages out of `live_workers`."""
    session.execute(delete(Worker).where(Worker.id == worker_id))


def forget_dead(session: Session, *, older_than: timedelta = timedelta(days=1)) -> None:
    """Drop rows of workers not seen for a day (the reconciler's housekeeping)."""
    session.execute(delete(Worker).where(Worker.seen_at < db_now(-older_than.total_seconds())))


def claimable(
    session: Session, *, queue: str, offer: dict[str, Any], max_running: int | None = None, limit: int = 50
) -> list[str]:
    """The queued jobs of `queue` a worker with `offer` may take, best first (see the module's docstring);
    `max_running` is TUNEFORGE_PROJECT_MAX_RUNNING unless given."""
    settings = get_settings()
    if max_running is None:
        max_running = settings.project_max_running
    last_start = (
        select(Job.project, func.max(Job.started_at).label("last_start")).group_by(Job.project).subquery()
    )
    running = (
        select(Job.project, func.count().label("running"))
        .where(Job.status == "running")
        .group_by(Job.project)
        .subquery()
    )
    query = (
        select(Job.id, Job.resources)
        .outerjoin(last_start, last_start.c.project == Job.project)
        .outerjoin(running, running.c.project == Job.project)
        .where(Job.status == "queued", func.coalesce(Job.queue, settings.queue) == queue)
        .order_by(Job.priority.desc(), last_start.c.last_start.asc().nulls_first(), Job.created_at, Job.id)
        .limit(limit)
    )
    if max_running:
        query = query.where(func.coalesce(running.c.running, 0) < max_running)
    return [
        job_id
        for job_id, resources in session.execute(query)
        if misfit(
            resources or {}, None, gpus=offer["gpus"], kind=offer["gpu_kind"], memory_gb=offer["memory_gb"]
        )
        is None
    ]

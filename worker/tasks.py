"""Celery tasks: thin wrappers that pass ids and delegate."""

from celery.signals import worker_init, worker_shutting_down

from app.queue import RUN_JOB, celery_app
from worker import health, launcher, runner


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    runner.run_job(job_id)


@worker_shutting_down.connect
def _checkpoint_and_requeue(**_: object) -> None:
    """Warm shutdown (SIGTERM): the running job checkpoints, stops and is re-queued (see worker.runner)."""
    runner.SHUTDOWN.set()


@worker_init.connect
def _warm_up_training(**_: object) -> None:
    """The template that training processes fork from imports torch and co. while the worker starts."""
    launcher.warm_up()


@worker_init.connect
def _start_heartbeat(**_: object) -> None:
    """The container healthcheck (`python -m worker.health`) reads the file this thread keeps fresh."""
    health.start_heartbeat()

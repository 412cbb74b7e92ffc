"""Celery tasks: thin wrappers that pass ids and delegate."""

from celery.signals import setup_logging, worker_init, worker_shutting_down

from app import logs
from app.queue import RUN_JOB, celery_app
from worker import health, launcher, runner


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    with logs.bound(job_id=job_id):  # runner adds the attempt once it has claimed one
        runner.run_job(job_id)


@setup_logging.connect
def _log_as_every_process_does(**_: object) -> None:
    """Celery leaves logging alone when this signal has a receiver: one format (app/logs.py) everywhere."""
    logs.configure()


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

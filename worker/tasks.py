"""Celery tasks: thin wrappers that pass ids and delegate."""

from celery.signals import setup_logging, worker_init, worker_shutdown, worker_shutting_down

from app import logs
from app.queue import RUN_JOB, celery_app
from worker import health, launcher, runner


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    runner.run_job(job_id)  # the message wakes the worker; the runner picks the job (and logs with its id)


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
    """The container healthcheck (`python -m worker.health`) reads the file this thread keeps fresh; the
    API routes jobs by the row another thread renews (app/jobs/routing.py)."""
    health.start_heartbeat()
    health.start_announcing()


@worker_shutdown.connect
def _retire(**_: object) -> None:
    health.retire()

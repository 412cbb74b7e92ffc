"""Celery tasks: thin wrappers that pass ids and delegate."""

from app.queue import RUN_JOB, celery_app
from worker import runner


@celery_app.task(name=RUN_JOB, acks_late=True, ignore_result=True)
def run_job(job_id: str) -> None:
    runner.run_job(job_id)

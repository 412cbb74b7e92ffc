"""`tuneforge jobs`: create, list, inspect, follow, control and read the metrics of fine-tuning jobs."""

import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml

from app.cli.client import OPTIONS, Client, CliError, fields, out, say, show, table, when
from app.cli.files import upload_file
from app.cli.follow import Follower

cli = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")

# `jobs follow` exits with these, for scripts and CI.
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}


# --- job bodies: from flags, or a YAML spec the flags override ------------------------------------------


def _typed(value: str) -> Any:
    """A --set value as YAML reads it: 8 is a number, true a boolean, q_proj,v_proj a string."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _file_id(client: Client, value: str | None, relative_to: Path) -> str | None:
    """A file id as given, or the id of the local file at that path (relative to `relative_to`) once
    uploaded."""
    if value is None or value.startswith("file-"):
        return value
    path = relative_to / value
    if not path.is_file():
        return value  # not a local file: the server says what it makes of it
    uploaded = upload_file(client, path)
    say(f"uploaded {path} as {uploaded['id']}")
    return uploaded["id"]


def job_body(
    client: Client,
    *,
    spec: Path | None,
    model: str | None,
    training_file: str | None,
    validation_file: str | None,
    task: str | None,
    method: str | None,
    epochs: int | None,
    batch_size: int | None,
    learning_rate_multiplier: float | None,
    suffix: str | None,
    seed: int | None,
    settings: list[str],
) -> dict[str, Any]:
    """The body of POST /v1/fine_tuning/jobs (OpenAI's shape; Tuneforge's knobs in the method's
    hyperparameters). Local files are uploaded last, once everything else is known to be well formed."""
    body: dict[str, Any] = {}
    if spec is not None:
        try:
            body = yaml.safe_load(spec.read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read the spec {spec}: {exc}") from None
        if not isinstance(body, dict):
            raise CliError(
                f"the spec {spec} must be a mapping: the job's body, as POST /v1/fine_tuning/jobs takes"
            )
    given = {
        "model": model,
        "suffix": suffix,
        "seed": seed,
        "training_file": training_file,
        "validation_file": validation_file,
    }
    body |= {key: value for key, value in given.items() if value is not None}
    method_block = body.setdefault("method", {})
    task = task or method_block.get("type") or "supervised"
    method_block["type"] = task
    hyperparameters = method_block.setdefault(task, {}).setdefault("hyperparameters", {})
    chosen = {
        "peft": method,
        "n_epochs": epochs,
        "batch_size": batch_size,
        "learning_rate_multiplier": learning_rate_multiplier,
    }
    hyperparameters |= {key: value for key, value in chosen.items() if value is not None}
    for setting in settings:
        key, equals, value = setting.partition("=")
        if not equals or not key:
            raise CliError(f"--set {setting!r}: write it as NAME=VALUE, e.g. --set lora_r=16")
        hyperparameters[key.strip()] = _typed(value)
    for required in ("model", "training_file"):
        if body.get(required) is None:
            raise CliError(f"a job needs --{required.replace('_', '-')} (or `{required}` in --spec)")
    # Paths in a spec are relative to the spec's folder; on the command line, to the current one.
    for key, flag in (("training_file", training_file), ("validation_file", validation_file)):
        base = Path(".") if flag is not None or spec is None else spec.parent
        body[key] = _file_id(client, body.get(key), base)
    return {key: value for key, value in body.items() if value is not None}


SpecOption = Annotated[Path | None, typer.Option(help="A YAML job body; the flags below override it.")]
ModelOption = Annotated[str | None, typer.Option(help="The base model.")]
TrainingOption = Annotated[str | None, typer.Option(help="A file id, or a local JSONL file to upload.")]
ValidationOption = Annotated[str | None, typer.Option(help="A file id, or a local JSONL file to upload.")]
TaskOption = Annotated[str | None, typer.Option(help="supervised (default), dpo or classification.")]
MethodOption = Annotated[str | None, typer.Option(help="lora, qlora, full, dora, ... or auto.")]
SetOption = Annotated[
    list[str] | None, typer.Option("--set", help="Another hyperparameter, NAME=VALUE (repeatable).")
]


@cli.command("create")
def jobs_create(
    spec: SpecOption = None,
    model: ModelOption = None,
    training_file: TrainingOption = None,
    validation_file: ValidationOption = None,
    task: TaskOption = None,
    method: MethodOption = None,
    epochs: Annotated[int | None, typer.Option(help="n_epochs.")] = None,
    batch_size: int | None = None,
    learning_rate_multiplier: float | None = None,
    suffix: str | None = None,
    seed: int | None = None,
    set_: SetOption = None,
    follow: Annotated[bool, typer.Option("--follow", help="Then follow it, as `jobs follow`.")] = False,
) -> None:
    """Create a fine-tuning job from flags or a YAML spec; prints it (and its id)."""
    with Client(timeout=600) as client:
        body = job_body(
            client,
            spec=spec,
            model=model,
            training_file=training_file,
            validation_file=validation_file,
            task=task,
            method=method,
            epochs=epochs,
            batch_size=batch_size,
            learning_rate_multiplier=learning_rate_multiplier,
            suffix=suffix,
            seed=seed,
            settings=set_ or [],
        )
        job = client.post("/v1/fine_tuning/jobs", json=body)
    if follow:
        say(f"created {job['id']}")
        jobs_follow(job["id"])
        return
    show(job, _job_fields(job))


# --- reading jobs ---------------------------------------------------------------------------------------


def _duration(job: dict) -> str:
    end = job.get("finished_at") or time.time()
    seconds = int(end - job["created_at"])
    return (
        f"{seconds // 3600}h{seconds // 60 % 60:02d}m"
        if seconds >= 3600
        else f"{seconds // 60}m{seconds % 60:02d}s"
    )


def _progress(job: dict) -> str:
    progress = job.get("progress")
    return f"{progress['step']}/{progress['total_steps']}" if progress else ""


def _method(job: dict) -> str:
    task = job["method"].get("type", "supervised")
    peft = (job["method"].get(task) or {}).get("hyperparameters", {}).get("peft", "")
    return peft if task == "supervised" else f"{task} {peft}".strip()


def _job_fields(job: dict) -> Any:
    error = job.get("error") or {}
    return fields(
        [
            ("id", job["id"]),
            ("status", job["status"]),
            ("model", job["model"]),
            ("method", _method(job)),
            ("progress", _progress(job)),
            ("fine-tuned model", job.get("fine_tuned_model")),
            ("created", when(job["created_at"])),
            ("duration", _duration(job)),
            ("trained tokens", job.get("trained_tokens")),
            ("error", error.get("message")),
            ("hyperparameters", json.dumps(job["hyperparameters"])),
        ]
    )


@cli.command("list")
def jobs_list(
    status_: Annotated[str | None, typer.Option("--status", help="Only jobs with this status.")] = None,
    limit: Annotated[int, typer.Option(help="At most this many (newest first).")] = 20,
) -> None:
    """Jobs of this key's project, newest first."""
    found: list[dict] = []
    after = None
    with Client() as client:
        while len(found) < limit:  # a status filter may need several pages
            page = client.get(
                "/v1/fine_tuning/jobs", params={"limit": 100} | ({"after": after} if after else {})
            )
            found += [j for j in page["data"] if status_ is None or j["status"] == status_]
            if not page["has_more"] or not page["data"]:
                break
            after = page["data"][-1]["id"]
    found = found[:limit]
    rows = [
        (j["id"], j["status"], _progress(j), j["model"], _method(j), when(j["created_at"]), _duration(j))
        for j in found
    ]
    show(found, table(("id", "status", "progress", "model", "method", "created", "duration"), rows))


@cli.command("get")
def jobs_get(job_id: str) -> None:
    """One job."""
    with Client() as client:
        job = client.get(f"/v1/fine_tuning/jobs/{job_id}")
    show(job, _job_fields(job))


def _act(job_id: str, action: str) -> None:
    with Client() as client:
        job = client.post(f"/v1/fine_tuning/jobs/{job_id}/{action}")
    show(job, fields([("id", job["id"]), ("status", job["status"])]))


@cli.command("cancel")
def jobs_cancel(job_id: str) -> None:
    """Cancel a job (a running one stops within a step)."""
    _act(job_id, "cancel")


@cli.command("pause")
def jobs_pause(job_id: str) -> None:
    """Pause a running job at its next step, with a checkpoint."""
    _act(job_id, "pause")


@cli.command("resume")
def jobs_resume(job_id: str) -> None:
    """Resume a paused job from its checkpoint."""
    _act(job_id, "resume")


TERMINAL_COLUMNS = ("step", "epoch", "train_loss", "valid_loss", "learning_rate", "tokens_per_second")


@cli.command("metrics")
def jobs_metrics(
    job_id: str, csv: Annotated[bool, typer.Option("--csv", help="Every column, as CSV.")] = False
) -> None:
    """The job's per-step metrics: a table (the main columns), every column with --csv or --json."""
    with Client() as client:
        if csv:
            print(
                client.request(
                    "GET", f"/v1/fine_tuning/jobs/{job_id}/metrics", headers={"Accept": "text/csv"}
                ).text,
                end="",
            )
            return
        series = client.get(f"/v1/fine_tuning/jobs/{job_id}/metrics")
    columns = [c for c in TERMINAL_COLUMNS if c in series["columns"]]

    def cell(value: Any) -> str:
        return "" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)

    rows = [[cell(row.get(c)) for c in columns] for row in series["data"]]
    show(series, table(columns, rows))


@cli.command("follow")
def jobs_follow(job_id: str) -> None:
    """Follow a job live: progress bar (step/total, loss, tokens/s, time left) and its log. Exits 0 when it
    succeeds, 1 when it fails, 3 when it is cancelled."""
    with Client() as client:
        job = Follower(client, job_id).run()
    if OPTIONS.json:
        show(job)
    error = (job.get("error") or {}).get("message")
    message = f"{job['id']} {job['status']}" + (f": {error}" if error else "")
    if job["status"] == "succeeded":
        out.print(f"{message}; fine-tuned model {job['fine_tuned_model']}", highlight=False)
        return
    raise CliError(message, exit_code=EXIT_CODES[job["status"]])

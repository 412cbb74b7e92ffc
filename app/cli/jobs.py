"""`tuneforge jobs`: create, list, inspect, follow, control and read the metrics of fine-tuning jobs."""

import json
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
import yaml
from httpx_sse import EventSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from app.cli.client import OPTIONS, Client, CliError, fields, out, show, status, table
from app.cli.files import upload_file

cli = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs.")

FINISHED = ("succeeded", "failed", "cancelled")
# `jobs follow` exits with these, for scripts and CI.
EXIT_CODES = {"succeeded": 0, "failed": 1, "cancelled": 3}
RECONNECT_SECONDS = 1.0
RECONNECT_FOR = 300.0  # then a server that stays away fails the follow


# --- job bodies: from flags, or a YAML spec the flags override ------------------------------------------


def _typed(value: str) -> Any:
    """A --set value as YAML reads it: 8 is a number, true a boolean, q_proj,v_proj a string."""
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError:
        return value


def _file_id(client: Client, value: str | None) -> str | None:
    """A file id as given, or the id of the local file at that path once uploaded."""
    if value is None or value.startswith("file-") or not Path(value).exists():
        return value
    uploaded = upload_file(client, Path(value))
    status.print(f"uploaded {value} as {uploaded['id']}", highlight=False)
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
    hyperparameters)."""
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
    given = {"model": model, "suffix": suffix, "seed": seed}
    body |= {key: value for key, value in given.items() if value is not None}
    for key, value in (("training_file", training_file), ("validation_file", validation_file)):
        if value is not None:
            body[key] = value
        body[key] = _file_id(client, body.get(key))
    body = {key: value for key, value in body.items() if value is not None}
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
        if required not in body:
            raise CliError(f"a job needs --{required.replace('_', '-')} (or `{required}` in --spec)")
    return body


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
        status.print(f"created {job['id']}", highlight=False)
        jobs_follow(job["id"])
        return
    show(job, _job_fields(job))


# --- reading jobs ---------------------------------------------------------------------------------------


def _when(seconds: int | None) -> str:
    return "" if seconds is None else datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d %H:%M:%S")


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
            ("created", _when(job["created_at"])),
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
        (j["id"], j["status"], _progress(j), j["model"], _method(j), _when(j["created_at"]), _duration(j))
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


# --- following a job ------------------------------------------------------------------------------------


class Follower:
    """`jobs follow`: the job's events drive a progress bar; its log lines print above the bar as they
    come. Both streams are read again from where they stopped when a connection drops."""

    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.last_event_id: str | None = None
        self.done = threading.Event()
        self.bar = Progress(
            TextColumn("{task.fields[status]:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=status,
            transient=False,
        )
        self.task = self.bar.add_task("", total=None, status="", loss="-", speed="-")

    def run(self) -> dict:
        job = self.client.get(f"/v1/fine_tuning/jobs/{self.job_id}")  # an unknown job fails here, at once
        self._show_job(job)
        logs = threading.Thread(target=self._follow_logs, name="log-follower", daemon=True)
        with self.bar:
            logs.start()
            while job["status"] not in FINISHED:
                self._follow_events()
                job = self._job()
                self._show_job(job)
            self.done.set()
            logs.join(timeout=5)  # the last lines of the log, if they are on their way
        return job

    def _show_job(self, job: dict) -> None:
        progress = job.get("progress") or {}
        self.bar.update(
            self.task,
            status=job["status"],
            completed=progress.get("step", 0),
            total=progress.get("total_steps"),
        )

    def _on_event(self, event: dict) -> None:
        data = event.get("data") or {}
        if event["type"] == "metrics" and "total_steps" in data:
            self.bar.update(
                self.task,
                completed=data["step"],
                total=data["total_steps"],
                loss=f"{data['train_loss']:.4f}",
                speed=f"{data.get('tokens_per_second', 0):.0f}",
            )
        elif event["type"] != "metrics":  # status changes and messages: above the bar, as the log is
            style = "red" if event["level"] == "error" else "yellow" if event["level"] == "warn" else "bold"
            self.bar.console.print(event["message"], style=style, markup=False, highlight=False)
            job = self._job_or_none()  # such events are few: the status they may have changed
            if job is not None:
                self.bar.update(self.task, status=job["status"])

    def _interrupted(self, what: str, error: Exception) -> None:
        self.bar.console.print(f"({what} interrupted: {error}; reconnecting)", style="dim", markup=False)
        time.sleep(RECONNECT_SECONDS)

    def _job(self) -> dict:
        """The job now, asked again while the server cannot be reached (for up to RECONNECT_FOR seconds)."""
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            try:
                return self.client.get(f"/v1/fine_tuning/jobs/{self.job_id}")
            except CliError as error:
                if not error.transient or time.monotonic() > deadline:
                    raise
                self._interrupted("the connection", error)

    def _follow_events(self) -> None:
        """Read the event stream until it ends (after the job's final status) or drops."""
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        try:
            with self.client.stream(
                "GET",
                f"/v1/fine_tuning/jobs/{self.job_id}/events",
                params={"stream": "true"},
                headers=headers,
                timeout=httpx.Timeout(30, read=None),
            ) as response:
                for sse in EventSource(response).iter_sse():
                    if sse.event == "message" and sse.data:
                        self.last_event_id = sse.id or self.last_event_id
                        self._on_event(json.loads(sse.data))
        except CliError as error:  # dropped: read on from the last event after a pause
            if not error.transient:
                raise
            self._interrupted("the event stream", error)
        except httpx.HTTPError as error:  # cut mid-stream
            self._interrupted("the event stream", error)

    def _follow_logs(self) -> None:
        """Print each attempt's log lines once, reconnecting where a connection dropped."""
        attempt, printed = 1, 0
        while not self.done.is_set():
            seen = 0
            try:
                with self.client.stream(
                    "GET",
                    f"/v1/fine_tuning/jobs/{self.job_id}/logs",
                    params={"follow": "true", "attempt": attempt},
                    timeout=httpx.Timeout(30, read=None),
                ) as response:
                    partial = ""  # a line counts once whole: a dropped connection may cut one short
                    for text in response.iter_text():
                        *lines, partial = (partial + text).split("\n")
                        for line in lines:
                            seen += 1
                            if seen > printed:  # after a reconnect the log starts over: skip what was shown
                                printed = seen
                                self.bar.console.print(line, style="dim", markup=False, highlight=False)
            except (CliError, httpx.HTTPError):  # no such attempt yet, or dropped: try again shortly
                pass
            job = self._job_or_none()
            if job is not None and job["attempt"] > attempt:
                attempt, printed = attempt + 1, 0
            elif job is not None and job["status"] in FINISHED and seen >= printed:
                return
            self.done.wait(RECONNECT_SECONDS)

    def _job_or_none(self) -> dict | None:
        try:
            return self.client.get(f"/v1/fine_tuning/jobs/{self.job_id}")
        except CliError:
            return None


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

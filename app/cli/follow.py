"""`tuneforge jobs follow`: a job live on a terminal.

The job's event stream drives a progress bar (step/total, loss, tokens/s, time left) and prints its
messages; a thread follows the run's log and prints each line above the bar. Either stream, when its
connection drops, is read again from where it stopped: events from the last id (`Last-Event-ID`), the
log from its start with the lines already shown skipped.
"""

import json
import threading
import time

import httpx
from httpx_sse import EventSource
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from app.cli.client import Client, CliError, status

FINISHED = ("succeeded", "failed", "cancelled")
RECONNECT_SECONDS = 1.0
PAUSED_POLL_SECONDS = 5.0  # a paused job's log does not grow: look again now and then
RECONNECT_FOR = 300.0  # then a server that stays away fails the follow
LOG_DRAIN_SECONDS = 10.0  # after the job ends, for the log's last lines to arrive
STREAMING = httpx.Timeout(30, read=None)  # a quiet stream is not a dead one


class Follower:
    def __init__(self, client: Client, job_id: str) -> None:
        self.client, self.job_id = client, job_id
        self.path = f"/v1/fine_tuning/jobs/{job_id}"
        self.last_event_id: str | None = None
        self.done = threading.Event()
        self.log_error: Exception | None = None
        self.bar = Progress(
            TextColumn("{task.fields[status]:<9}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps  loss {task.fields[loss]}  {task.fields[speed]} tok/s"),
            TimeRemainingColumn(),
            console=status,
        )
        self.task = self.bar.add_task("", total=None, status="", loss="-", speed="-")

    def run(self) -> dict:
        """Follow until the job has finished; the job then."""
        job = self.client.get(self.path)  # an unknown job fails here, at once
        self._show_job(job)
        logs = threading.Thread(target=self._follow_logs_safely, name="log-follower", daemon=True)
        with self.bar:
            logs.start()
            try:
                while job["status"] not in FINISHED:
                    self._follow_events()
                    job = self._job()
                    self._show_job(job)
                logs.join(LOG_DRAIN_SECONDS)  # it ends by itself once the last attempt's log has
            finally:
                self.done.set()  # before the client closes: the thread makes no request after this
                logs.join(RECONNECT_SECONDS + 1)
        if self.log_error is not None:
            self.say(f"(the log could not be followed: {self.log_error})", style="dim")
        return job

    def say(self, text: str, style: str = "") -> None:
        """A line above the bar, printed as it is (no markup: it may hold anything)."""
        self.bar.console.print(text, style=style, markup=False, highlight=False)

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
            self.say(event["message"], {"error": "red", "warn": "yellow"}.get(event["level"], "bold"))
            job = self._job_or_none()  # such events are few: the status they may have changed
            if job is not None:
                self.bar.update(self.task, status=job["status"])

    def _interrupted(self, what: str, error: Exception) -> None:
        self.say(f"({what} interrupted: {error}; reconnecting)", style="dim")
        time.sleep(RECONNECT_SECONDS)

    def _job(self) -> dict:
        """The job now, asked again while the server cannot be reached (for up to RECONNECT_FOR seconds)."""
        deadline = time.monotonic() + RECONNECT_FOR
        while True:
            try:
                return self.client.get(self.path)
            except CliError as error:
                if not error.transient or time.monotonic() > deadline:
                    raise
                self._interrupted("the connection", error)

    def _job_or_none(self) -> dict | None:
        try:
            return self.client.get(self.path)
        except CliError:
            return None

    def _follow_events(self) -> None:
        """Read the event stream until it ends (after the job's final status) or drops."""
        headers = {"Last-Event-ID": self.last_event_id} if self.last_event_id else {}
        events = f"{self.path}/events"
        try:
            with self.client.stream(
                "GET", events, params={"stream": "true"}, headers=headers, timeout=STREAMING
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

    def _follow_logs_safely(self) -> None:
        try:
            self._follow_logs()
        except Exception as error:  # a thread's traceback would break the one-line promise: say it once
            self.log_error = error

    def _follow_logs(self) -> None:
        """Print each attempt's log lines once, reconnecting where a connection dropped."""
        attempt, printed = 1, 0
        while not self.done.is_set():
            seen, partial = 0, ""  # a line counts once whole: a dropped connection may cut one short
            ended = False
            try:
                with self.client.stream(
                    "GET",
                    f"{self.path}/logs",
                    params={"follow": "true", "attempt": attempt},
                    timeout=STREAMING,
                ) as response:
                    for text in response.iter_text():
                        *lines, partial = (partial + text).split("\n")
                        for line in lines:
                            seen += 1
                            if seen > printed:  # after a reconnect the log starts over: skip what was shown
                                printed = seen
                                self.say(line, style="dim")
                ended = True
            except (CliError, httpx.HTTPError):  # no such attempt yet, or dropped: try again shortly
                pass
            job = self._job_or_none()
            over = job is not None and (job["attempt"] > attempt or job["status"] in FINISHED)
            if ended and over and partial and seen >= printed:  # the attempt's last line, unterminated
                self.say(partial, style="dim")
            if job is not None and job["attempt"] > attempt:
                attempt, printed = attempt + 1, 0
            elif job is not None and job["status"] in FINISHED and ended:
                return
            paused = job is not None and job["status"] == "paused"
            self.done.wait(PAUSED_POLL_SECONDS if paused else RECONNECT_SECONDS)

"""Experiment tracking: a job's `integrations` are validated, kept, echoed, and reported to.

One small SFT job (4 steps, with a validation file), created through the openai SDK, reports to all three
trackers at once and serves the module, offline: Weights & Biases in offline mode (WANDB_MODE and
WANDB_DIR: tests/conftest.py) writes its run file into the test home, which is read record by record
with wandb's own protobuf types (wandb ships no offline reader in Python); MLflow logs into a local store
(MLFLOW_TRACKING_URI: tests/conftest.py, as an operator would set it; a request may only name an http(s)
server), read back with MlflowClient; TensorBoard's event files come back as the job's second results
file and are read with TensorBoard's own EventAccumulator. Each tracker must hold the job's own step
metrics, as GET /metrics lists them, and the resolved spec as the run's config.
"""

import io
import json
import os
import struct
import tarfile
from pathlib import Path

import httpx
import openai
import pytest
from openai.types.fine_tuning import FineTuningJob

from tests.helpers import all_events, chat_jsonl, job_body, upload, wait_for_status

STEPS = 4  # 16 examples at batch 4, one epoch
EXPERIMENT = "tuneforge-tracking-test"
INTEGRATIONS = [
    {"type": "wandb", "wandb": {"project": "tuneforge-tests", "entity": "tuneforge", "tags": ["ci", "tiny"]}},
    {"type": "mlflow", "mlflow": {"experiment_name": EXPERIMENT}},
    {"type": "tensorboard"},
]
# As the job echoes them: each type with its own block, unset fields as null.
ECHOED = [
    {
        "type": "wandb",
        "wandb": {"project": "tuneforge-tests", "name": None, "entity": "tuneforge", "tags": ["ci", "tiny"]},
    },
    {"type": "mlflow", "mlflow": {"tracking_uri": None, "experiment_name": EXPERIMENT}},
    {"type": "tensorboard"},
]


@pytest.fixture(scope="module")
def client(server: str, api_key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server}/v1", api_key=api_key, max_retries=0)


@pytest.fixture(scope="module")
def created(http: httpx.Client, client: openai.OpenAI) -> FineTuningJob:
    training = upload(http, chat_jsonl(16))
    validation = upload(http, chat_jsonl(8, offset=100), "valid.jsonl")
    body = job_body(training["id"], batch_size=4)
    return client.fine_tuning.jobs.create(
        model=body["model"],
        training_file=training["id"],
        validation_file=validation["id"],
        seed=body["seed"],
        method=body["method"],
        integrations=INTEGRATIONS,  # type: ignore[arg-type]  # the SDK types W&B's only
    )


@pytest.fixture(scope="module")
def finished(http: httpx.Client, created: FineTuningJob) -> dict:
    job = wait_for_status(http, created.id, {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return job


@pytest.fixture(scope="module")
def train_losses(http: httpx.Client, finished: dict) -> dict[int, float]:
    """The job's train_loss by step, as GET /metrics lists it: what every tracker must hold."""
    rows = http.get(f"/v1/fine_tuning/jobs/{finished['id']}/metrics").json()["data"]
    losses = {row["step"]: row["train_loss"] for row in rows if row["train_loss"] is not None}
    assert sorted(losses) == list(range(1, STEPS + 1)), rows
    return losses


def wandb_records(path: Path) -> list:
    """The records of a W&B run file: LevelDB's log format (32 KiB blocks of CRC-framed chunks) after a
    7-byte W&B header, each record one of wandb's own `Record` protobufs."""
    from wandb.proto.wandb_internal_pb2 import Record

    block, data = 32 * 1024, path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pending, at = [], b"", 7
    while at + 7 <= len(data):
        if block - at % block < 7:  # a block's tail too short for a chunk header is padding
            at += block - at % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[at : at + 7])
        pending, at = pending + data[at + 7 : at + 7 + length], at + 7 + length
        if kind in (1, 4):  # a full record, or the last chunk of one
            record = Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
        elif kind == 0:  # zero-filled rest of the file's last block
            break
    return records


def test_integrations_are_echoed_on_create_retrieve_and_list(
    http: httpx.Client, client: openai.OpenAI, created: FineTuningJob
) -> None:
    assert created.to_dict()["integrations"] == ECHOED
    assert http.get(f"/v1/fine_tuning/jobs/{created.id}").json()["integrations"] == ECHOED
    retrieved = client.fine_tuning.jobs.retrieve(created.id)
    assert retrieved.integrations and retrieved.integrations[0].wandb.project == "tuneforge-tests"
    listed = {job.id: job for job in client.fine_tuning.jobs.list(limit=100)}
    assert listed[created.id].to_dict()["integrations"] == ECHOED


def test_wandb_offline_run_holds_the_jobs_metrics_and_spec(
    http: httpx.Client, finished: dict, train_losses: dict[int, float]
) -> None:
    runs = {}
    for path in Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*/run-*.wandb"):
        records = wandb_records(path)
        [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
        runs[run.display_name] = (run, records)
    run, records = runs[finished["id"]]  # the run is named after the job
    assert (run.project, run.entity, list(run.tags)) == ("tuneforge-tests", "tuneforge", ["ci", "tiny"])
    config = {item.key: json.loads(item.value_json) for item in run.config.update}
    spec = config["tuneforge"]
    assert (spec["job_id"], spec["model"], spec["seed"]) == (finished["id"], "tiny-llama", 7)
    assert spec["method"] == finished["method"] and spec["validation_file"] == finished["validation_file"]
    history = [  # a key with a slash travels split into its parts
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    logged = {row["train/global_step"]: row["train/loss"] for row in history if "train/loss" in row}
    assert logged == pytest.approx(train_losses, rel=1e-5)
    assert any("eval/loss" in row for row in history)  # the validation file's loss too
    assert any(r.WhichOneof("record_type") == "exit" and r.exit.exit_code == 0 for r in records)


def test_mlflow_run_holds_the_jobs_metrics_and_spec(finished: dict, train_losses: dict[int, float]) -> None:
    from mlflow.tracking import MlflowClient

    mlflow = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = mlflow.get_experiment_by_name(EXPERIMENT)
    assert experiment is not None
    [run] = mlflow.search_runs(
        [experiment.experiment_id], filter_string=f"attributes.run_name = '{finished['id']}'"
    )
    assert run.info.status == "FINISHED"
    history = mlflow.get_metric_history(run.info.run_id, "loss")
    assert {m.step: m.value for m in history} == pytest.approx(train_losses, rel=1e-5)
    assert "eval_loss" in run.data.metrics
    params = run.data.params
    assert (params["tuneforge.job_id"], params["tuneforge.model"], params["tuneforge.seed"]) == (
        finished["id"],
        "tiny-llama",
        "7",
    )
    assert params["tuneforge.method.supervised.hyperparameters.batch_size"] == "4"
    assert float(params["learning_rate"]) == 2e-4  # and the trainer's own arguments, from MLflowCallback


def test_tensorboard_events_come_back_as_a_results_file(
    http: httpx.Client, finished: dict, train_losses: dict[int, float], tmp_path: Path
) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    csv_id, tensorboard_id = finished["result_files"]  # the step metrics first, as before
    assert http.get(f"/v1/files/{csv_id}").json()["filename"] == "step_metrics.csv"
    described = http.get(f"/v1/files/{tensorboard_id}").json()
    assert (described["filename"], described["purpose"]) == ("tensorboard.tar.gz", "fine-tune-results")
    content = http.get(f"/v1/files/{tensorboard_id}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(content.content)) as archive:
        archive.extractall(tmp_path, filter="data")
    events = EventAccumulator(str(tmp_path))
    events.Reload()
    logged = {event.step: event.value for event in events.Scalars("train/loss")}
    assert logged == pytest.approx(train_losses, rel=1e-5)
    assert "eval/loss" in events.Tags()["scalars"]
    [spec] = events.Tensors("tuneforge/run_config/text_summary")
    assert finished["id"] in spec.tensor_proto.string_val[0].decode()


def test_the_run_says_where_it_reports(http: httpx.Client, finished: dict) -> None:
    events = all_events(http, finished["id"])
    [reporting] = [e for e in events if e["message"].startswith("Reporting to ")]
    assert reporting["data"]["integrations"] == ["wandb", "mlflow", "tensorboard"]
    assert not [e for e in events if e["level"] == "warn"], events


@pytest.fixture(scope="module")
def training_id(http: httpx.Client) -> str:
    return upload(http, chat_jsonl(4))["id"]


@pytest.mark.usefixtures("finished")  # after the module's job, whose W&B run is then on disk
def test_a_tracker_that_cannot_start_is_a_warning_and_training_goes_on(
    http: httpx.Client, training_id: str
) -> None:
    """Its MLflow server is unreachable (nothing listens on the port; MLFLOW_HTTP_REQUEST_MAX_RETRIES=0 in
    tests/conftest.py): the job warns and trains, and reports to nothing it did not list, W&B included."""
    from app.services import free_port

    def wandb_runs() -> set[Path]:  # a W&B run's folder appears when it starts, whether or not it ends
        return set(Path(os.environ["WANDB_DIR"]).glob("wandb/offline-run-*"))

    wandb_runs_before = wandb_runs()
    unreachable = {"type": "mlflow", "mlflow": {"tracking_uri": f"http://127.0.0.1:{free_port()}"}}
    created = http.post("/v1/fine_tuning/jobs", json=job_body(training_id) | {"integrations": [unreachable]})
    assert created.status_code == 200, created.text
    job = wait_for_status(http, created.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    events = all_events(http, job["id"])
    [warning] = [e for e in events if e["level"] == "warn"]
    assert (
        warning["message"].startswith("MLflow is off for this run: ")
        and "Training goes on" in warning["message"]
    )
    assert warning["data"]["integration"] == "mlflow"
    assert not [e for e in events if e["message"].startswith("Reporting to ")]
    assert len(job["result_files"]) == 1  # the CSV alone: no TensorBoard events to ship
    assert wandb_runs() == wandb_runs_before  # W&B is installed and configured, but the job did not list it


@pytest.mark.parametrize(
    ("integrations", "param", "says"),
    [
        ([{"type": "comet"}], "integrations.0.type", "'wandb', 'mlflow' or 'tensorboard'"),
        ([{"type": "wandb", "wandb": {"project": "p", "api_key": "k"}}], "integrations.0.wandb.api_key", ""),
        ([{"type": "wandb", "wandb": {"name": "run"}}], "integrations.0.wandb.project", "required"),
        ([{"type": "wandb"}], "integrations.0", "needs its 'wandb' block"),
        ([{"type": "tensorboard", "token": "t"}], "integrations.0.token", ""),
        (
            [{"type": "mlflow", "mlflow": {"tracking_uri": "file:///tmp/x"}}],
            "integrations.0.mlflow.tracking_uri",
            "",
        ),
        (
            [{"type": "tensorboard"}, {"type": "tensorboard"}],
            "integrations",
            "integrations[0] and integrations[1]",
        ),
    ],
)
def test_bad_integrations_are_bad_requests_naming_the_field(
    http: httpx.Client, training_id: str, integrations: list, param: str, says: str
) -> None:
    response = http.post("/v1/fine_tuning/jobs", json=job_body(training_id) | {"integrations": integrations})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", param, "invalid_value")
    assert says in error["message"]

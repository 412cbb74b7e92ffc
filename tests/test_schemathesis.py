"""Schemathesis over the whole OpenAPI spec, against real API servers over HTTP.

Two runs, both checking: no 5xx, and every status code, content type and body is one the spec documents.
- Stateless: every operation gets a bounded number of generated requests, authenticated with a real key,
  against the shared test server. Random ids never match a stored file, so no request here starts a
  training job. The inference routes are included: the `server` fixture runs the inference server too,
  and random model names get its 404 envelope.
- Stateful: scenarios follow the spec's OpenAPI links (an upload's id into a job, a job's id into
  retrieve, cancel, pause, resume, events and checkpoints), so generated requests hit stored objects. It
  runs on a stack of its own with no worker (`tests/stack.py`): the jobs it creates stay queued, paused or
  cancelled, and never train on the shared worker.
"""

import uuid
from collections import Counter
from typing import Any

import httpx
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.checks import not_a_server_error
from schemathesis.generation.stateful.state_machine import StepInput, StepOutput
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ensure_resource_availability,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    use_after_free,
)
from sqlalchemy.orm import Session

from app.keys import service as key_service
from app.main import create_app
from tests.helpers import chat_jsonl
from tests.stack import Stack, stack  # noqa: F401 (fixture)

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def never_ending(case: schemathesis.Case) -> None:
    """Drop what turns a request into a live stream: one that follows a job that never runs (no worker
    trains these) would never end. tests/test_streams.py tests the streams."""
    if isinstance(case.query, dict):
        case.query.pop("stream", None)
        case.query.pop("follow", None)


# Built in process (the same app the server runs: checked below), because schemathesis' lazy
# `from_fixture` loader does not work with this pytest; requests still go to the real server.
schema = schemathesis.openapi.from_dict(create_app().openapi())


@schema.parametrize()
@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_conforms_to_its_openapi_spec(case: schemathesis.Case, server: str, api_key: str) -> None:
    never_ending(case)
    case.call_and_validate(
        base_url=server, headers={"Authorization": f"Bearer {api_key}"}, checks=CHECKS, timeout=30
    )


def test_served_spec_is_the_one_tested(server: str) -> None:
    assert httpx.get(f"{server}/openapi.json").json() == create_app().openapi()


# --- stateful: the spec's links lead to stored objects ------------------------------------------------

# Only the links the spec declares: schemathesis would otherwise infer more from names, and a declared
# link that broke would go unnoticed behind an inferred one.
DECLARED_LINKS_ONLY = schemathesis.Config.from_dict(
    {"phases": {"stateful": {"inference": {"algorithms": []}}}}
)
# What the generator cannot guess: a valid training file to upload, and a base model that exists.
TRAINING_FILE = chat_jsonl(4)
BASE_MODEL = "tiny-llama"  # registered by tests/stack.py
STATE_REFUSALS = {"job_not_pausable", "job_not_paused", "file_in_use"}
# Each link the spec must declare, as (source, target). Each must be followed with the stored object's real
# id, and the target must find that object, at least once: it answers 2xx, or refuses for the state the
# object is in (a cancelled job cannot be paused; a file a job uses cannot be deleted).
MUST_FOLLOW = {
    ("POST /v1/files", target)
    for target in (
        "GET /v1/files/{file_id}",
        "GET /v1/files/{file_id}/content",
        "DELETE /v1/files/{file_id}",
        "POST /v1/fine_tuning/jobs",
        "POST /v1/fine_tuning/estimate",
    )
} | {
    ("POST /v1/fine_tuning/jobs", target)
    for target in (
        "GET /v1/fine_tuning/jobs/{job_id}",
        "POST /v1/fine_tuning/jobs/{job_id}/cancel",
        "POST /v1/fine_tuning/jobs/{job_id}/pause",
        "POST /v1/fine_tuning/jobs/{job_id}/resume",
        "GET /v1/fine_tuning/jobs/{job_id}/events",
        "GET /v1/fine_tuning/jobs/{job_id}/logs",
        "GET /v1/fine_tuning/jobs/{job_id}/checkpoints",
        "GET /v1/files/{file_id}",
    )
}


def found(response: schemathesis.Response) -> bool:
    """Whether the answer is one only a stored object gets."""
    return response.status_code < 300 or response.json()["error"]["code"] in STATE_REFUSALS


def test_stateful_scenarios_follow_the_links_to_stored_objects(stack: Stack) -> None:  # noqa: F811
    """Scenarios chain upload -> job -> retrieve, cancel, pause, resume, events...: no 5xx, every answer as
    documented, and schemathesis' stateful checks (what was created can be read, what was deleted is gone)."""
    linked = schemathesis.openapi.from_dict(create_app().openapi(), config=DECLARED_LINKS_ONLY)
    followed: Counter[tuple[str, str]] = Counter()  # (source, target): answers that found the linked object

    class Scenario(linked.as_state_machine()):  # type: ignore[misc]  # a class built at run time
        def setup(self) -> None:
            # A project of its own per scenario: what one scenario stored cannot change another's answers,
            # so Hypothesis sees the same answers whenever it replays the same choices.
            with Session(stack.db) as session:
                _, self.key = key_service.create_key(session, project=f"schemathesis-{uuid.uuid4().hex[:8]}")
                session.commit()

        def before_call(self, case: schemathesis.Case) -> None:
            never_ending(case)
            if case.operation.label == "POST /v1/files":
                case.body = {"file": TRAINING_FILE, "purpose": "fine-tune"}
            elif case.operation.label in ("POST /v1/fine_tuning/jobs", "POST /v1/fine_tuning/estimate"):
                if isinstance(case.body, dict):
                    case.body["model"] = BASE_MODEL
                    # Random resources and priorities are mostly refused (400s tests/test_routing.py
                    # covers), which would starve the links that follow a created job.
                    case.body.pop("resources", None)
                    case.body.pop("priority", None)

        def get_call_kwargs(self, case: schemathesis.Case) -> dict[str, Any]:
            return {"base_url": stack.url, "headers": {"Authorization": f"Bearer {self.key}"}, "timeout": 30}

        def validate_response(
            self, response: schemathesis.Response, case: schemathesis.Case, *_: Any, **kwargs: Any
        ) -> None:
            stateful_checks = [use_after_free, ensure_resource_availability]
            case.validate_response(
                response, checks=CHECKS + stateful_checks, transport_kwargs=kwargs, recorder=self.recorder
            )

        def step(self, input: StepInput) -> StepOutput:
            output = super().step(input)
            if input.transition is not None and input.is_applied and found(output.response):
                source, _, target = input.transition.id.split(" -> ")  # 'SOURCE -> [200] NAME -> TARGET'
                followed[source, target] += 1
            return output

    Scenario.run(
        settings=settings(
            # Scenarios, about 1,300 requests in all: at 50, whether every link was reached once turned
            # on small changes elsewhere (each reached 8 or more times at 75).
            max_examples=75,
            stateful_step_count=25,
            deadline=None,
            derandomize=True,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
    )
    missing = MUST_FOLLOW - set(followed)
    assert not missing, (
        f"links that never reached a stored object: {sorted(missing)}; reached: {dict(followed)}"
    )

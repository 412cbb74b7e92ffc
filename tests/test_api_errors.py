"""Bad input and isolation through real HTTP: every error in OpenAI's envelope, with the right status."""

import httpx
import pytest

from tests.helpers import chat_jsonl, job_body, upload


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def test_missing_key_is_401(server: str) -> None:
    error = error_of(httpx.get(f"{server}/v1/models"), 401)
    assert error["code"] == "missing_api_key"
    assert "Authorization" in error["message"]


def test_unknown_key_is_401(server: str) -> None:
    response = httpx.get(f"{server}/v1/files", headers={"Authorization": "Bearer tf-not-a-key"})
    assert error_of(response, 401)["code"] == "invalid_api_key"


def test_revoked_key_is_401(server: str, database: str) -> None:
    from app.db.session import session_scope
    from app.keys import service as key_service

    with session_scope() as session:
        key, token = key_service.create_key(session, project="gamma")
    headers = {"Authorization": f"Bearer {token}"}
    assert httpx.get(f"{server}/v1/files", headers=headers).status_code == 200
    with session_scope() as session:
        key_service.revoke_key(session, key_id=key.id)
    assert error_of(httpx.get(f"{server}/v1/files", headers=headers), 401)["code"] == "invalid_api_key"


def test_malformed_jsonl_lists_lines_and_codes(http: httpx.Client) -> None:
    bad = (
        chat_jsonl(2)
        + b'{"messages": [{"role": "user", "content": "hi"}]}\n'
        + b"not json\n"
        + b'{"messages": [{"role": "robot", "content": "x"}]}\n'
    )
    response = http.post("/v1/files", files={"file": ("bad.jsonl", bad)}, data={"purpose": "fine-tune"})
    error = error_of(response, 400)
    assert error["param"] == "file"
    assert error["code"] == "missing_assistant"
    assert "line 3" in error["message"] and "line 4" in error["message"] and "line 5" in error["message"]
    assert "robot" in error["message"]
    listed = http.get("/v1/files").json()["data"]
    assert all(f["filename"] != "bad.jsonl" for f in listed), "a rejected file must not be stored"


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "empty_file"),
        (b"\xff\xfe\n", "invalid_encoding"),
        (b"[1, 2]\n", "not_an_object"),
        (b'{"prompt": "a"}\n', "missing_completion"),
        (b'{"body": "a"}\n', "unrecognized_format"),
    ],
)
def test_each_bad_file_gets_its_code(http: httpx.Client, data: bytes, code: str) -> None:
    response = http.post("/v1/files", files={"file": ("bad.jsonl", data)}, data={"purpose": "fine-tune"})
    assert error_of(response, 400)["code"] == code


def test_wrong_purpose_is_400(http: httpx.Client) -> None:
    response = http.post(
        "/v1/files", files={"file": ("t.jsonl", chat_jsonl(2))}, data={"purpose": "assistants"}
    )
    assert error_of(response, 400)["param"] == "purpose"


def test_file_round_trip(http: httpx.Client) -> None:
    data = chat_jsonl(3)
    created = upload(http, data, "roundtrip.jsonl")
    assert created["bytes"] == len(data) and created["object"] == "file"
    assert http.get(f"/v1/files/{created['id']}").json() == created
    assert http.get(f"/v1/files/{created['id']}/content").content == data
    assert http.delete(f"/v1/files/{created['id']}").json() == {
        "id": created["id"],
        "object": "file",
        "deleted": True,
    }
    assert error_of(http.get(f"/v1/files/{created['id']}"), 404)["code"] == "file_not_found"


def test_unknown_base_model_is_404_naming_it(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(2))
    body = job_body(training["id"]) | {"model": "no-such-model"}
    error = error_of(http.post("/v1/fine_tuning/jobs", json=body), 404)
    assert error["param"] == "model" and "no-such-model" in error["message"]


def test_missing_training_file_is_404(http: httpx.Client, tiny_model: str) -> None:
    error = error_of(http.post("/v1/fine_tuning/jobs", json=job_body("file-doesnotexist")), 404)
    assert error["param"] == "training_file" and "file-doesnotexist" in error["message"]


@pytest.mark.parametrize(
    ("hyperparameters", "param"),
    [
        ({"lora_r": 0}, "method.supervised.hyperparameters.lora_r"),
        ({"n_epochs": -1}, "method.supervised.hyperparameters.n_epochs"),
        ({"peft": "magic"}, "method.supervised.hyperparameters.peft"),
        ({"lora_dropout": 1.5}, "method.supervised.hyperparameters.lora_dropout"),
        ({"no_such_knob": 1}, "method.supervised.hyperparameters.no_such_knob"),
        ({"target_modules": ["not_a_layer"]}, "method.supervised.hyperparameters.target_modules"),
    ],
)
def test_invalid_spec_is_400_naming_the_field(http: httpx.Client, hyperparameters: dict, param: str) -> None:
    training = upload(http, chat_jsonl(2))
    error = error_of(http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], **hyperparameters)), 400)
    assert error["param"] == param


def test_bad_suffix_is_400(http: httpx.Client) -> None:
    training = upload(http, chat_jsonl(2))
    error = error_of(
        http.post("/v1/fine_tuning/jobs", json=job_body(training["id"]) | {"suffix": "../x"}), 400
    )
    assert error["param"] == "suffix"


def test_other_projects_objects_are_404_and_unlisted(
    http: httpx.Client, other_http: httpx.Client, finished_job: dict
) -> None:
    model_id = finished_job["fine_tuned_model"]
    job_id = finished_job["id"]
    for path in (
        f"/v1/files/{finished_job['training_file']}",
        f"/v1/files/{finished_job['training_file']}/content",
        f"/v1/fine_tuning/jobs/{job_id}",
        f"/v1/fine_tuning/jobs/{job_id}/events",
        f"/v1/fine_tuning/jobs/{job_id}/checkpoints",
        f"/v1/models/{model_id}",
        f"/v1/models/{model_id}/adapter",
    ):
        assert http.get(path).status_code == 200, path
        error_of(other_http.get(path), 404)
    error_of(other_http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel"), 404)
    error_of(other_http.delete(f"/v1/models/{model_id}"), 404)
    body = job_body(finished_job["training_file"])
    assert error_of(other_http.post("/v1/fine_tuning/jobs", json=body), 404)["param"] == "training_file"
    assert job_id not in {j["id"] for j in other_http.get("/v1/fine_tuning/jobs").json()["data"]}
    assert model_id not in {m["id"] for m in other_http.get("/v1/models").json()["data"]}
    assert "tiny-llama" in {m["id"] for m in other_http.get("/v1/models").json()["data"]}


def test_ops_endpoints(server: str) -> None:
    assert httpx.get(f"{server}/livez").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/readyz").json()
    assert ready["checks"] == {"database": "ok", "broker": "ok", "inference": "ok"}
    assert "/v1/fine_tuning/jobs" in httpx.get(f"{server}/openapi.json").json()["paths"]
    assert httpx.get(f"{server}/docs").status_code == 200

"""GET /v1/files pages as OpenAI's does: `limit`, `order`, `after`; `has_more`, `first_id`, `last_id`."""

import uuid
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import make_key
from tests.helpers import chat_jsonl, upload

COUNT = 5


def client(server: str, key: str) -> httpx.Client:
    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}, timeout=30)


@pytest.fixture(scope="module")
def project(server: str) -> Iterator[tuple[httpx.Client, str, list[str]]]:
    """A project of its own holding five files; yields its client, key and file ids, oldest first."""
    key = make_key(f"files-list-{uuid.uuid4().hex[:8]}")
    with client(server, key) as http:
        ids = [upload(http, chat_jsonl(2, offset=n), f"train-{n}.jsonl")["id"] for n in range(COUNT)]
        yield http, key, ids


def walk(http: httpx.Client, **params: object) -> list[dict]:
    """Every page of the list, following `last_id` until `has_more` is false."""
    pages, after = [], None
    while True:
        page = http.get("/v1/files", params=params | ({"after": after} if after else {})).json()
        pages.append(page)
        if not page["has_more"]:
            return pages
        after = page["last_id"]


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    return response.json()["error"]


def test_default_is_every_file_newest_first(project: tuple[httpx.Client, str, list[str]]) -> None:
    http, _, ids = project
    page = http.get("/v1/files").json()
    assert [f["id"] for f in page["data"]] == ids[::-1]
    assert (page["object"], page["has_more"]) == ("list", False)
    assert (page["first_id"], page["last_id"]) == (ids[-1], ids[0])


@pytest.mark.parametrize("order", ["desc", "asc"])
def test_limit_two_walks_every_file_once_with_after(
    project: tuple[httpx.Client, str, list[str]], order: str
) -> None:
    http, _, ids = project
    expected = ids[::-1] if order == "desc" else ids
    pages = walk(http, limit=2, order=order)
    assert [[f["id"] for f in page["data"]] for page in pages] == [expected[0:2], expected[2:4], expected[4:]]
    assert [page["has_more"] for page in pages] == [True, True, False]
    assert [(page["first_id"], page["last_id"]) for page in pages] == [
        (expected[0], expected[1]),
        (expected[2], expected[3]),
        (expected[4], expected[4]),
    ]


def test_a_page_that_ends_exactly_at_the_last_file_has_no_more(
    project: tuple[httpx.Client, str, list[str]],
) -> None:
    http, _, ids = project
    page = http.get("/v1/files", params={"limit": COUNT}).json()
    assert len(page["data"]) == COUNT and page["has_more"] is False
    after_last = http.get("/v1/files", params={"after": ids[0]}).json()
    assert after_last == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}


def test_limit_above_the_maximum_is_clamped_not_refused(project: tuple[httpx.Client, str, list[str]]) -> None:
    http, _, ids = project
    response = http.get("/v1/files", params={"limit": 100_000})
    assert response.status_code == 200, response.text
    assert [f["id"] for f in response.json()["data"]] == ids[::-1]


@pytest.mark.parametrize(
    ("params", "param"), [({"limit": 0}, "limit"), ({"limit": "ten"}, "limit"), ({"order": "up"}, "order")]
)
def test_invalid_limit_or_order_is_a_400_naming_it(
    project: tuple[httpx.Client, str, list[str]], params: dict, param: str
) -> None:
    http, _, _ = project
    error = error_of(http.get("/v1/files", params=params), 400)
    assert (error["type"], error["param"]) == ("invalid_request_error", param)


def test_unknown_after_is_a_404_naming_the_cursor(project: tuple[httpx.Client, str, list[str]]) -> None:
    http, _, _ = project
    # `after` names a file; like any other reference to a file that is not the caller's, it is a 404.
    error = error_of(http.get("/v1/files", params={"after": "file-doesnotexist"}), 404)
    assert (error["code"], error["param"]) == ("file_not_found", "after")
    assert "file-doesnotexist" in error["message"]


def test_another_projects_file_as_after_reads_as_unknown(
    project: tuple[httpx.Client, str, list[str]], server: str
) -> None:
    http, _, _ = project
    with client(server, make_key(f"files-other-{uuid.uuid4().hex[:8]}")) as other:
        theirs = upload(other, chat_jsonl(2))["id"]
    mine = error_of(http.get("/v1/files", params={"after": theirs}), 404)
    unknown = error_of(http.get("/v1/files", params={"after": "file-" + "0" * 24}), 404)
    assert mine == unknown | {"message": f"No such file: '{theirs}'."}  # as if it did not exist


def test_purpose_filter_stays(project: tuple[httpx.Client, str, list[str]]) -> None:
    http, _, ids = project
    listed = http.get("/v1/files", params={"purpose": "fine-tune"}).json()["data"]
    assert [f["id"] for f in listed] == ids[::-1]
    empty = http.get("/v1/files", params={"purpose": "batch", "limit": 2}).json()
    assert (empty["data"], empty["first_id"], empty["last_id"], empty["has_more"]) == ([], None, None, False)


def test_openai_sdk_auto_pagination_walks_every_file(
    project: tuple[httpx.Client, str, list[str]], server: str
) -> None:
    _, key, ids = project
    sdk = openai.OpenAI(base_url=server + "/v1", api_key=key, max_retries=0)
    first = sdk.files.list(limit=2)
    assert [f.id for f in first.data] == ids[:-3:-1] and first.has_more
    assert [f.id for f in first] == ids[::-1]  # iterating a page fetches the pages after it
    assert [f.id for f in sdk.files.list(limit=2, order="asc")] == ids

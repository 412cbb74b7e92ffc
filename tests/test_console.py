"""The web console at /ui, in a real browser: Playwright driving Debian's chromium against the real stack.

Every page is used as a person would (a key typed in, buttons clicked, files chosen) under the console's
own Content-Security-Policy, and what it shows is read back from the page: the number of points plotly
drew, the text of a status badge, the rows of a table. A screenshot of each page goes to
tests/output/console/. Chromium comes from Debian (`make setup` installs it), never `playwright install`.
"""

import hashlib
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, BrowserContext, Page, expect, sync_playwright

from app.db.session import session_scope
from app.keys import service as key_service
from tests.helpers import chat_jsonl, job_body, upload, wait_for_status

CHROMIUM = Path("/usr/bin/chromium")
SCREENSHOTS = Path(__file__).parent / "output" / "console"
KEY_NAME = "tuneforge.apiKey"  # where app/ui/static/api.js keeps the key

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), (
        "Debian's chromium is missing: `make setup` installs it (apt-get install chromium)"
    )
    with sync_playwright() as playwright:
        # Chromium will not start its sandbox as root (it needs an unprivileged user to drop to), and the
        # tests run as root here: the sandbox is off, for pages of our own server only.
        browser = playwright.chromium.launch(
            executable_path=str(CHROMIUM), headless=True, args=["--no-sandbox"]
        )
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def context(browser: Browser) -> Iterator[BrowserContext]:
    """One browser profile for the module: its cache keeps the 5 MB plotly.js after the first page."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
    yield context
    context.close()


class Console:
    """A tab on the console: `open(route)` types the key in and goes to the page at `#<route>`."""

    def __init__(self, page: Page, server: str, api_key: str) -> None:
        self.page, self.server, self.api_key = page, server, api_key
        self.problems: list[str] = []  # uncaught errors and CSP violations: none may happen
        page.on("pageerror", lambda error: self.problems.append(f"uncaught: {error}"))
        page.on(
            "console",
            lambda message: (
                self.problems.append(message.text) if "Content Security Policy" in message.text else None
            ),
        )

    def sign_in(self, key: str) -> None:
        self.page.fill("#api-key", key)
        self.page.click("#key-form button[type=submit]")

    def open(self, route: str) -> Page:
        self.page.goto(f"{self.server}/ui#{route}")
        self.sign_in(self.api_key)
        expect(self.page.locator("#key-form")).to_have_count(0)
        return self.page

    def go(self, route: str) -> None:
        """Another page of the console, in the same tab (a hash change: no reload, the key stays)."""
        self.page.evaluate("(route) => { location.hash = route }", route)

    def screenshot(self, name: str) -> None:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)

    def points(self, chart: str, trace: int = 0) -> int:
        """How many points plotly has drawn in trace `trace` of the chart with id `chart`."""
        return self.page.evaluate(
            "([id, trace]) => document.getElementById(id)?.data?.[trace]?.x?.length ?? 0", [chart, trace]
        )

    def traces(self, chart: str) -> list[dict]:
        return self.page.evaluate(
            "(id) => (document.getElementById(id)?.data ?? [])"
            ".map((t) => ({name: t.name, points: t.x.length}))",
            chart,
        )


@pytest.fixture
def console(context: BrowserContext, server: str, api_key: str) -> Iterator[Console]:
    """A fresh tab (its sessionStorage empty: every test types its key in); no errors allowed on it."""
    page = context.new_page()
    tab = Console(page, server, api_key)
    yield tab
    page.close()
    assert not tab.problems, tab.problems


def wait_until(condition: Callable[[], object], what: str, timeout: float = 60) -> None:
    """Poll `condition` from here: the page's CSP forbids the eval that Playwright's own waiting uses."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:.0f} s"
        time.sleep(0.2)


def bad_line_3() -> bytes:
    lines = chat_jsonl(8).splitlines()
    lines[2] = b'{"messages": [{"role": "user", "content": "Anyone there?"}]}'  # no assistant answer
    return b"\n".join(lines) + b"\n"


@pytest.fixture(scope="module")
def second_job(http: httpx.Client, finished_job: dict) -> dict:
    """A job like `finished_job` but for its learning rate, run to success: something to compare it with."""
    training = upload(http, chat_jsonl())
    body = job_body(training["id"], learning_rate_multiplier=4) | {"suffix": "hotter"}
    response = http.post("/v1/fine_tuning/jobs", json=body)
    assert response.status_code == 200, response.text
    job = wait_for_status(http, response.json()["id"], {"succeeded", "failed", "cancelled"})
    assert job["status"] == "succeeded", job
    return job


def test_pages_are_served_under_a_strict_policy_and_stay_out_of_the_api_schema(server: str) -> None:
    page = httpx.get(f"{server}/ui")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "script-src 'self';" in policy and "connect-src 'self'" in policy and "unsafe-eval" not in policy
    assert "set-cookie" not in page.headers
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page.text, re.S)
    assert scripts and all(
        'src="/ui/static/' in attributes and not body.strip() for attributes, body in scripts
    )
    for src in re.findall(r'src="(/ui/static/[^"]+)"', page.text):
        script = httpx.get(f"{server}{src}")
        assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript"), src
    import plotly

    shipped = Path(plotly.__file__).parent / "package_data" / "plotly.min.js"
    assert httpx.get(f"{server}/ui/static/vendor/plotly.min.js").content == shipped.read_bytes()
    assert httpx.get(f"{server}/ui/static/routes.py").status_code == 404  # only the console's own files
    assert not [
        path for path in httpx.get(f"{server}/openapi.json").json()["paths"] if path.startswith("/ui")
    ]


def test_a_wrong_key_shows_the_servers_message_and_another_can_be_entered(
    console: Console, server: str, api_key: str
) -> None:
    page = console.page
    page.goto(f"{server}/ui#/jobs")
    expect(page.locator("#key-form")).to_be_visible()  # no key yet: nothing is fetched without one
    console.sign_in("tf-not-a-key")
    refused = httpx.get(f"{server}/v1/models", headers={"Authorization": "Bearer tf-not-a-key"})
    expect(page.locator("#key-form .error")).to_have_text(refused.json()["error"]["message"])
    console.screenshot("key")

    with session_scope() as session:  # a key revoked while the page polls with it
        row, doomed = key_service.create_key(session, project="alpha")
    console.sign_in(doomed)
    expect(page.locator("#jobs")).to_be_visible()
    assert page.evaluate(f"sessionStorage.getItem('{KEY_NAME}')") == doomed
    assert console.page.context.cookies() == []
    with session_scope() as session:
        key_service.revoke_key(session, key_id=row.id)
    expect(page.locator("#key-form .error")).to_have_text("Invalid or revoked API key.", timeout=15_000)
    assert page.evaluate(f"sessionStorage.getItem('{KEY_NAME}')") is None

    console.sign_in(api_key)
    expect(page.locator("#jobs")).to_be_visible()


def test_a_running_job_gains_points_live_and_is_paused_resumed_and_cancelled_from_its_page(
    console: Console, http: httpx.Client
) -> None:
    # 1,200 steps: a tiny model trains up to 20 a second here, and the job must outlast the watching. It is
    # cancelled once watched, so its length costs nothing.
    training = upload(http, chat_jsonl(48))
    created = http.post("/v1/fine_tuning/jobs", json=job_body(training["id"], n_epochs=25, batch_size=1))
    assert created.status_code == 200, created.text
    job_id = created.json()["id"]

    page = console.open("/jobs")
    row = page.locator(f'tr[data-job="{job_id}"]')
    expect(row).to_be_visible()
    first = row.locator(".progress-label").inner_text()
    # The list refreshes itself: the row's progress moves on with no reload.
    wait_until(
        lambda: row.locator(".progress-label").inner_text() not in ("", first), "the row's progress moved"
    )
    page.select_option("#status-filter", "running")
    expect(page.locator("#jobs tbody tr")).to_have_count(1)
    console.screenshot("jobs")

    row.get_by_role("link", name=job_id).click()
    expect(page.locator("#job-status")).to_have_text("running")
    wait_until(lambda: console.points("loss-chart") >= 2, "the loss curve has points")
    seen = console.points("loss-chart")
    wait_until(lambda: console.points("loss-chart") > seen, "the loss curve gained points")
    assert console.points("lr-chart") >= seen
    expect(page.locator("#log")).to_contain_text("training loss=")
    console.screenshot("job")

    page.click("#pause")  # the run stops at the end of its step, after a checkpoint
    expect(page.locator("#job-status")).to_have_text("paused", timeout=30_000)
    expect(page.locator("#resume")).to_be_enabled()
    page.click("#resume")  # a new attempt continues from that checkpoint; its log is followed too
    expect(page.locator("#job-status")).to_have_text("running", timeout=30_000)
    expect(page.locator("#log")).to_contain_text("--- attempt 2 ---")
    seen = console.points("loss-chart")
    wait_until(lambda: console.points("loss-chart") > seen, "the curve went on after the resume")

    page.click("#cancel")
    expect(page.locator("#job-status")).to_have_text("cancelled", timeout=30_000)
    expect(page.locator("#cancel")).to_be_disabled()
    assert http.get(f"/v1/fine_tuning/jobs/{job_id}").json()["status"] == "cancelled"


def test_two_finished_jobs_compared(
    console: Console, http: httpx.Client, finished_job: dict, second_job: dict
) -> None:
    # Straight to the comparison: the session's first job may be past the jobs page's first 100 rows by
    # now (the selection there is what builds this address).
    page = console.open(f"/compare?jobs={finished_job['id']},{second_job['id']}")

    wait_until(lambda: len(console.traces("compare-loss")) >= 2, "the compared curves are drawn")
    curves = [t for t in console.traces("compare-loss") if t["name"].endswith(" train")]
    assert sorted(t["name"] for t in curves) == sorted(f"{j['id']} train" for j in (finished_job, second_job))
    steps = len(http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}/metrics").json()["data"])
    assert all(t["points"] == steps for t in curves), curves

    differing = page.locator("#differences tbody tr.differs th").all_inner_texts()
    assert {"learning_rate_multiplier", "learning_rate", "training file"} <= set(differing), differing
    assert "base model" not in differing
    assert page.locator("#differences tbody tr").count() == len(differing)  # only what differs, at first
    page.uncheck("#only-differences")
    assert page.locator("#differences tbody tr:not(.differs) th").all_inner_texts()[0] == "base model"
    console.screenshot("compare")


def test_a_job_submitted_from_the_form(console: Console, http: httpx.Client) -> None:
    page = console.open("/new")
    expect(page.locator("#base-model option[value='tiny-llama']")).to_have_count(1)
    page.set_input_files(
        "#training-file",
        files=[{"name": "bad.jsonl", "mimeType": "application/jsonl", "buffer": bad_line_3()}],
    )
    expect(page.locator("#new-job .error").first).to_contain_text("line 3: assistant message missing")
    assert page.locator("#create-job").is_disabled()

    good = {"name": "good.jsonl", "mimeType": "application/jsonl", "buffer": chat_jsonl(8)}
    page.set_input_files("#training-file", files=[good])
    page.select_option("#peft", "dora")
    page.fill("#n-epochs", "1")
    page.fill("#suffix", "from-console")
    # Each change takes the plan back until one for the form as it now is has come: then it may be sent.
    expect(page.locator("#create-job")).to_be_enabled()
    expect(page.locator("#plan tbody tr")).to_have_count(1)
    expect(page.locator("#plan tbody tr")).to_contain_text("dora")
    expect(page.locator("#plan tbody tr")).to_contain_text("fits")
    console.screenshot("new-job")

    page.click("#create-job")
    expect(page).to_have_url(re.compile(r"#/jobs/ftjob-"))
    job_id = page.url.rsplit("/", 1)[-1]
    try:
        job = http.get(f"/v1/fine_tuning/jobs/{job_id}").json()
        assert job["suffix"] == "from-console"
        assert (
            job["method"]["supervised"]["hyperparameters"].items() >= {"peft": "dora", "n_epochs": 1}.items()
        )
        files = http.get("/v1/files").json()["data"]
        assert next(f for f in files if f["id"] == job["training_file"])["filename"] == "good.jsonl"
    finally:
        http.post(f"/v1/fine_tuning/jobs/{job_id}/cancel")  # the worker has better things to do


def test_a_finished_job_lists_its_checkpoints_and_downloads_its_adapter_and_merged_model(
    console: Console, http: httpx.Client, finished_job: dict, tmp_path: Path
) -> None:
    page = console.open(f"/jobs/{finished_job['id']}")
    expect(page.locator("#job-status")).to_have_text("succeeded")
    steps = len(http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}/metrics").json()["data"])
    wait_until(lambda: console.points("loss-chart") == steps, "the whole loss curve is drawn")
    checkpoints = http.get(f"/v1/fine_tuning/jobs/{finished_job['id']}/checkpoints").json()["data"]
    expect(page.locator("#checkpoints tbody tr")).to_have_count(len(checkpoints))
    expect(page.locator("#checkpoints thead")).to_contain_text("train_loss")
    expect(page.locator("#log")).to_contain_text("Step 1/")
    model = finished_job["fine_tuned_model"]
    expect(page.locator("#open-playground")).to_have_attribute("href", re.compile("#/playground"))
    console.screenshot("finished-job")

    with page.expect_download() as downloading:
        page.click("#download-adapter")
    saved = tmp_path / downloading.value.suggested_filename
    downloading.value.save_as(saved)
    served = http.get(f"/v1/models/{model}/adapter").content
    assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(served).digest()

    with page.expect_download(timeout=120_000) as downloading:  # merged by the inference server on demand
        page.click("#download-merged")
    assert downloading.value.suggested_filename.endswith("-merged.tar.gz")
    downloading.value.save_as(tmp_path / "merged.tar.gz")
    with tarfile.open(tmp_path / "merged.tar.gz") as archive:
        names = {Path(name).name for name in archive.getnames()}
    assert "tuneforge.json" in names and any(name.endswith(".safetensors") for name in names), names


def test_the_playground_streams_a_fine_tuned_model_and_its_base_side_by_side(
    console: Console, finished_job: dict
) -> None:
    model = finished_job["fine_tuned_model"]
    page = console.open("/models")
    expect(page.locator("#models")).to_contain_text(model)
    console.screenshot("models")
    page.get_by_role("link", name=model).click()
    expect(page.locator("#playground-model")).to_have_value(model)
    expect(page.locator("#answer-base h2")).to_have_text("tiny-llama (base)")

    page.fill("#prompt", "What is 3 plus 3?")
    page.fill("#max-tokens", "12")
    # Count each time an answer grows: a streamed answer grows once per piece. The observer may hear of
    # several pieces at once (one network read can carry several events), so each record is looked at:
    # the text each change put in.
    page.evaluate(
        """() => {
            window.answerUpdates = {};
            for (const pane of ["answer-tuned", "answer-base"]) {
                window.answerUpdates[pane] = 0;
                const answer = document.querySelector(`#${pane} .answer`);
                let length = answer.textContent.length;
                new MutationObserver((records) => {
                    for (const record of records) {
                        const put = record.type === "characterData"
                            ? record.target.data
                            : [...record.addedNodes].map((node) => node.textContent).join("");
                        if (put.length > length) window.answerUpdates[pane]++;
                        if (put.length) length = put.length;
                    }
                }).observe(answer, { childList: true, characterData: true, subtree: true });
            }
        }"""
    )
    page.click("#send")  # disables itself until both answers have ended
    expect(page.locator("#send")).to_be_enabled(timeout=60_000)
    updates = page.evaluate("window.answerUpdates")
    assert updates["answer-tuned"] >= 2 and updates["answer-base"] >= 2, updates
    for pane in ("answer-tuned", "answer-base"):
        assert page.locator(f"#{pane} .answer").inner_text().strip(), pane
        expect(page.locator(f"#{pane} .error")).to_be_hidden()
    console.screenshot("playground")

"""The logs API end to end: HTTP requests to a real ReadApi over a real ClickHouse (embedded chdb and the
server, via the `storage` fixture), rows inserted as the consumer inserts them."""

from __future__ import annotations

import base64
import csv
import io
import json
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from cohere_gateway.consumers import logs, queries
from cohere_gateway.consumers.backends import Backend
from cohere_gateway.consumers.http_api import ReadApi
from cohere_gateway.consumers.metrics import Metrics
from cohere_gateway.events import Event
from tests.fixtures.clickhouse import Storage, make_event
from tests.test_storage import insert_events

TOKEN = "logs-test-token"


class Client:
    def __init__(self, api: ReadApi, token: str | None = TOKEN) -> None:
        self.url = api.url
        self.token = token

    def call(
        self, method: str, path: str, body: Any = None, ctype: str = "application/json"
    ) -> tuple[int, Any]:
        data = None if body is None else (body if isinstance(body, bytes) else json.dumps(body).encode())
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", ctype)
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                raw, status, kind = resp.read(), resp.status, resp.headers.get("Content-Type", "")
        except urllib.error.HTTPError as exc:
            raw, status, kind = exc.read(), exc.code, exc.headers.get("Content-Type", "")
        return status, json.loads(raw) if kind.startswith("application/json") else raw.decode()

    def get(self, path: str) -> Any:
        status, body = self.call("GET", path)
        assert status == 200, body
        return body


def serve(backend: Backend, token: str = TOKEN) -> ReadApi:
    api = ReadApi(backend, Metrics(storage_ready=True, kafka_ready=True), "127.0.0.1", 0, token=token)
    api.start()
    return api


@pytest.fixture
def loaded(clickhouse_backend: Backend) -> Iterator[tuple[Backend, list[Event], Client]]:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=40)
    events = [make_event(i, base, cache_status="HIT" if i % 10 == 0 else None) for i in range(150)]
    insert_events(clickhouse_backend, events, "logs-1")
    api = serve(clickhouse_backend)
    try:
        yield clickhouse_backend, events, Client(api)
    finally:
        api.stop()


def newest_first(events: list[Event]) -> list[str]:
    return [e.event_id for e in sorted(events, key=lambda e: (e.start_time, e.event_id), reverse=True)]


def test_cursor_pages_list_every_event_once_while_events_arrive(loaded: Any) -> None:
    backend, events, client = loaded
    seen: list[str] = []
    page = client.get("/api/logs?since=2h&limit=40")
    later = datetime.now(UTC) + timedelta(seconds=2)
    arrived = 0
    while True:
        seen += [row["event_id"] for row in page["events"]]
        # Events keep arriving between pages: newer than the first page, and some inside its window.
        insert_events(backend, [make_event(arrived, later)], f"late-{arrived}")
        arrived += 1
        if not page["next_cursor"]:
            break
        page = client.get(f"/api/logs?since=2h&limit=40&cursor={page['next_cursor']}")
    assert seen == newest_first(events)
    assert arrived == 4  # 150 events in pages of 40
    until = (later + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    fresh = client.get(f"/api/logs?since=2h&until={until}&limit=1000")
    assert len(fresh["events"]) == 150 + arrived and fresh["next_cursor"] is None


def test_pages_read_from_the_newest_hours_first_and_list_exactly_what_a_full_scan_lists(
    clickhouse_backend: Backend,
) -> None:
    """A page reads the last 5 minutes before where it starts, then wider spans, and the window only when
    those hold too few (consumers.queries.newest); pages that begin inside one probe and end in the next, or
    past all of them, still list every event once, newest first."""
    now = datetime.now(UTC).replace(microsecond=0)
    offsets = [*range(10, 200, 9), *range(400, 3400, 97), *range(4000, 200_000, 4001)]  # s before now
    events = [make_event(i, now - timedelta(seconds=s + i * 7)) for i, s in enumerate(offsets)]
    insert_events(clickhouse_backend, events, "logs-probes")
    asked: list[str] = []
    real_query = clickhouse_backend.query

    def spy(sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        if params and "after_id" in params:
            asked.append(params["since"])
        return real_query(sql, params)

    clickhouse_backend.query = spy  # type: ignore[method-assign]
    api = serve(clickhouse_backend)
    try:
        client = Client(api)
        for query in ("since=3d&limit=7", "since=3d&limit=30&model=command-r-plus", "since=3d&limit=1000"):
            seen: list[str] = []
            page = client.get(f"/api/logs?{query}")
            while True:
                seen += [row["event_id"] for row in page["events"]]
                if not page["next_cursor"]:
                    break
                page = client.get(f"/api/logs?{query}&cursor={page['next_cursor']}")
            keep = [e for e in events if "model=" not in query or e.model == "command-r-plus"]
            assert seen == newest_first(keep), query
    finally:
        api.stop()
    # Most pages were answered by a probe: fewer queries over the whole window than pages.
    whole = [s for s in asked if s == min(asked)]
    assert len(asked) > len(whole) > 0


@pytest.mark.parametrize(
    ("query", "keep"),
    [
        ("model=command-r-plus", lambda e: e.model == "command-r-plus"),
        ("endpoint=embed", lambda e: e.endpoint == "embed"),
        ("status_code=429", lambda e: e.status_code == 429),
        ("outcome=upstream_error", lambda e: e.outcome == "upstream_error"),
        ("metadata_key=user&metadata_value=user-2", lambda e: e.metadata.get("user") == "user-2"),
        ("cached=true", lambda e: e.cache_status == "HIT"),
        ("cached=false", lambda e: e.cache_status != "HIT"),
        (
            "account_id=acct-b&gateway_id=gw-dev",
            lambda e: e.account_id == "acct-b" and e.gateway_id == "gw-dev",
        ),
    ],
)
def test_filters_match_a_recomputation(loaded: Any, query: str, keep: Any) -> None:
    _, events, client = loaded
    wanted = [e for e in events if keep(e)]
    assert wanted, "the filter should match some events"
    got = client.get(f"/api/logs?since=2h&limit=1000&{query}")
    assert [r["event_id"] for r in got["events"]] == newest_first(wanted)


def test_key_fingerprint_and_time_filters(loaded: Any) -> None:
    _, events, client = loaded
    fp = events[4].api_key_fingerprint
    got = client.get(f"/api/logs?since=2h&limit=1000&api_key_fingerprint={fp}")
    assert [r["event_id"] for r in got["events"]] == newest_first(
        [e for e in events if e.api_key_fingerprint == fp]
    )
    cut = events[100].start_time
    iso = cut.isoformat().replace("+00:00", "Z")
    got = client.get(f"/api/logs?since=2h&until={iso}&limit=1000")
    assert [r["event_id"] for r in got["events"]] == newest_first([e for e in events if e.start_time < cut])


def test_feedback_last_write_wins_filters_and_counts(loaded: Any, storage: Storage) -> None:
    _, events, client = loaded
    target, other = events[5], events[6]
    status, body = client.call("PATCH", f"/api/logs/{target.event_id}", {"feedback": 1, "score": 40})
    assert status == 200, body
    assert body["feedback"] == 1 and body["score"] == 40
    status, body = client.call(
        "PATCH", f"/api/logs/{target.event_id}", {"feedback": -1, "metadata": {"ticket": "T-9"}}
    )
    assert status == 200 and body == body | {"feedback": -1, "score": 40, "metadata": {"ticket": "T-9"}}
    client.call("PATCH", f"/api/logs/{other.event_id}", {"feedback": 1})
    one = client.get(f"/api/logs/{target.event_id}")
    assert one["event_id"] == target.event_id and one["feedback"]["feedback"] == -1
    assert [r["event_id"] for r in client.get("/api/logs?since=2h&feedback=-1")["events"]] == [
        target.event_id
    ]
    assert [r["event_id"] for r in client.get("/api/logs?since=2h&feedback=1")["events"]] == [other.event_id]
    per_model = {r["key"]: r for r in client.get("/api/feedback?since=2h&by=model")}
    assert per_model[target.model or ""]["negative"] == 1
    assert sum(r["positive"] for r in per_model.values()) == 1
    per_gateway = {r["key"]: r for r in client.get("/api/feedback?since=2h&by=gateway_id")}
    assert sum(r["negative"] + r["positive"] for r in per_gateway.values()) == 2
    # The feedback is in ClickHouse, not in the process: reopen the storage as a restarted consumer does.
    storage.close()
    reopened = storage.open()
    api = serve(reopened)
    try:
        again = Client(api).get(f"/api/logs/{target.event_id}")
        assert again["feedback"] | {"updated_at": None} == {
            "feedback": -1,
            "score": 40,
            "metadata": {"ticket": "T-9"},
            "updated_at": None,
        }
    finally:
        api.stop()


def test_writes_need_the_token_and_a_clear_body(loaded: Any) -> None:
    backend, events, client = loaded
    eid = events[1].event_id
    assert Client(_api_of(client), token=None).call("PATCH", f"/api/logs/{eid}", {"feedback": 1})[0] == 401
    assert Client(_api_of(client), token="wrong").call("DELETE", "/api/logs?model=x")[0] == 401
    assert (
        client.call("PATCH", f"/api/logs/{eid}", b"feedback=1", "application/x-www-form-urlencoded")[0] == 415
    )
    for bad in ({"feedback": 2}, {"score": 101}, {"score": "9"}, {"colour": "red"}, {"metadata": {"a": 1}}):
        status, body = client.call("PATCH", f"/api/logs/{eid}", bad)
        assert status == 400 and body["error"], bad
    assert client.call("PATCH", "/api/logs/01890000-0000-7000-8000-000000000000", {"feedback": 1})[0] == 404
    assert client.call("GET", "/api/logs?since=2h&feedback=3")[0] == 400
    assert client.call("GET", "/api/logs?since=2h&colour=red")[0] == 400
    assert client.call("GET", "/api/logs?cursor=not-a-cursor")[0] == 400
    # A deployment without a token cannot be written to at all.
    open_api = ReadApi(backend, Metrics(storage_ready=True, kafka_ready=True), "127.0.0.1", 0)
    open_api.start()
    try:
        status, body = Client(open_api, token=None).call("PATCH", f"/api/logs/{eid}", {"feedback": 1})
        assert status == 403 and "--api-token" in body["error"]
    finally:
        open_api.stop()


def _api_of(client: Client) -> Any:
    return type("Addr", (), {"url": client.url})()


def test_delete_dry_run_counts_exactly_then_erases_exactly(loaded: Any) -> None:
    _, events, client = loaded
    doomed = [e for e in events if e.metadata.get("user") == "user-1"]
    assert client.call("DELETE", "/api/logs?since=2h")[0] == 400  # no filter: refused
    status, dry = client.call(
        "DELETE", "/api/logs?since=2h&metadata_key=user&metadata_value=user-1&dry_run=true"
    )
    assert status == 200 and dry["matched"] == len(doomed) and dry["deleted"] == 0
    assert len(client.get("/api/logs?since=2h&limit=1000")["events"]) == len(events)
    status, done = client.call("DELETE", "/api/logs?since=2h&metadata_key=user&metadata_value=user-1")
    assert status == 200 and done["matched"] == done["deleted"] == len(doomed)
    left = client.get("/api/logs?since=2h&limit=1000")["events"]
    assert [r["event_id"] for r in left] == newest_first([e for e in events if e not in doomed])
    assert client.call("GET", f"/api/logs/{doomed[0].event_id}")[0] == 404


def test_export_csv_and_json_stream_every_matching_event(
    loaded: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, events, client = loaded
    monkeypatch.setattr(logs, "EXPORT_PAGE", 7)  # many pages: the export walks the cursor
    wanted = newest_first([e for e in events if e.endpoint == "chat"])
    status, text = client.call("GET", "/api/logs/export?since=2h&endpoint=chat&format=csv")
    assert status == 200
    rows = list(csv.DictReader(io.StringIO(text)))
    assert [r["event_id"] for r in rows] == wanted
    first = next(e for e in events if e.event_id == rows[0]["event_id"])
    assert json.loads(rows[0]["metadata"]) == first.metadata
    status, text = client.call("GET", "/api/logs/export?since=2h&endpoint=chat&format=json")
    assert status == 200
    assert [json.loads(line)["event_id"] for line in text.splitlines()] == wanted
    assert client.call("GET", "/api/logs/export?format=xml")[0] == 400


def test_csv_cells_that_a_spreadsheet_would_run_are_quoted(clickhouse_backend: Backend) -> None:
    base = datetime.now(UTC) - timedelta(minutes=5)
    insert_events(
        clickhouse_backend, [make_event(1, base, metadata={"user": "=HYPERLINK(1)"}, model="-2+3")], "x"
    )
    _, chunks = logs.export(clickhouse_backend, {"since": "1h", "format": "csv"})
    row = next(csv.DictReader(io.StringIO(b"".join(chunks).decode())))
    assert row["model"] == "'-2+3" and json.loads(row["metadata"]) == {"user": "=HYPERLINK(1)"}


def test_dashboard_gives_feedback_on_an_event_and_shows_it_per_model(
    clickhouse_backend: Backend, browser: Any
) -> None:
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=20)
    events = [make_event(i, base) for i in range(12)]
    insert_events(clickhouse_backend, events, "dash-fb")
    api = serve(clickhouse_backend)
    try:
        # Logged in with HTTP Basic (the token as password): what the browser sends once the user typed it.
        basic = base64.b64encode(f"op:{TOKEN}".encode()).decode()
        browser.call("Network.enable")
        browser.call("Network.setExtraHTTPHeaders", headers={"Authorization": f"Basic {basic}"})
        browser.goto(api.url + "/")
        browser.wait_for("document.body.dataset.loaded === 'true'", what="the dashboard's first load")
        assert browser.js("document.querySelector('#feedback tbody').textContent").startswith("no requests")
        browser.js("document.querySelector('#recent tbody tr').click()")
        browser.wait_for(
            "document.querySelector('#detail-body').textContent.includes('\"feedback\"')", what="detail"
        )
        shown = browser.js("document.querySelector('#detail-id').textContent")
        browser.js("document.querySelector('[data-feedback=\"-1\"]').click()")
        browser.wait_for(
            "document.querySelector('#detail-feedback-status').textContent === 'saved'", what="saved"
        )
        assert Client(api).get(f"/api/logs/{shown}")["feedback"]["feedback"] == -1
        model = next(e.model for e in events if e.event_id == shown) or "(none)"
        row = browser.wait_for(
            "(() => { const r = [...document.querySelectorAll('#feedback tbody tr')]"
            ".map((tr) => [...tr.children].map((td) => td.textContent)); return r.length && r; })()",
            what="the feedback table",
        )
        assert row == [[model, "0", "1", "0.0%", "0", "–"]]
    finally:
        api.stop()


def test_a_reader_gone_before_its_answer_is_not_printed_as_an_error(
    clickhouse_backend: Backend, capsys: pytest.CaptureFixture[str]
) -> None:
    """The dashboard cancels requests when it refreshes again; the API must not print a traceback per
    cancelled request (it did: BrokenPipeError from socketserver), but still prints real errors."""
    api = serve(clickhouse_backend)
    try:
        for error in (BrokenPipeError(32, "Broken pipe"), ValueError("a real bug")):
            try:
                raise error
            except Exception:
                api.server.handle_error(None, ("127.0.0.1", 1))
    finally:
        api.stop()
    printed = capsys.readouterr().err
    assert "BrokenPipeError" not in printed and "a real bug" in printed


def test_newest_sizes_each_span_from_what_the_last_one_held() -> None:
    """Pure: a filter matching one row every 10 minutes over 30 days. The 5-minute probe finds nothing or
    one; the next span is sized to hold 100 with a margin, so the third query at the latest answers, and
    the answer is exactly the newest 100 (fixed 5 min / 1 h / 1 day steps took four)."""
    upper = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
    since = upper - timedelta(days=30)
    times = [upper - timedelta(minutes=10 * i + 3) for i in range(30 * 144)]
    asked: list[str] = []

    def query(p: dict[str, str]) -> list[dict[str, Any]]:
        asked.append(p.get("since", "window"))
        lo = datetime.fromisoformat(p["since"]).replace(tzinfo=UTC) if "since" in p else since
        return [{"t": t} for t in times if t >= lo][:100]

    rows = queries.newest(query, since, upper, 100)
    assert [r["t"] for r in rows] == times[:100]
    assert len(asked) <= 3 and "window" not in asked
    # A span never reaches past the window: a rare filter ends with the whole window, asked once.
    asked.clear()
    assert queries.newest(lambda p: query(p)[:1], since, upper, 100) == [{"t": times[0]}]
    assert asked.count("window") == 1

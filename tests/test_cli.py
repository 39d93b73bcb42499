"""The fiddler-async command, run as a user runs it: in a subprocess."""

from __future__ import annotations

import datetime as dt
import functools
import json
import os
import re
import select
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from fiddler_async import cli as cli_module
from fiddler_async.emulator import Emulator, Store, emulator_process
from fiddler_async.rows import RowError, coerce_row, count_rows, file_format, read_rows

from .in_process import TOKEN

EXAMPLE = Path(__file__).parent.parent / "examples" / "bank_churn.csv"


def cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fiddler_async.cli", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=120,
        check=False,
    )


def refusal(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int | str | None, str]:
    """A command that stops before doing anything, run in this process (a second and more
    faster than a new one): its exit status and what it wrote to stderr."""
    try:
        code: int | str | None = cli_module.main(list(args))
    except SystemExit as exc:  # argparse's refusals
        code = exc.code
    return code, capsys.readouterr().err


def to(fiddler: Emulator) -> list[str]:
    return ["--url", fiddler.url, "--token", TOKEN]


def test_publish_to_the_embedded_emulator_then_inspect(tmp_path: Path) -> None:
    done = cli(
        "publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert "delivered    5,000" in done.stdout
    assert "embedded Fiddler emulator, stored in fiddler-emulator.db" in done.stdout
    assert "p99 enqueue" in done.stdout
    again = cli(
        "publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn", cwd=tmp_path
    )
    assert "It now holds 10,000 events for bank_churn/bank_churn, 5,000 of them" in again.stdout
    (tmp_path / "fiddler-emulator.db").unlink()
    cli("publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn", cwd=tmp_path)
    shown = cli("inspect", "--events", "2", "--duplicates", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0] == "bank_churn/bank_churn: 5,000 events, 5,000 distinct ids, 0 duplicates"
    first = json.loads(lines[1])
    assert (first["event_id"], first["creditscore"], first["balance"]) == (
        "evt-000000",
        398,
        134834.3,
    )


def test_bad_rows_are_named_and_the_good_ones_delivered(tmp_path: Path, fiddler: Emulator) -> None:
    rows = tmp_path / "events.jsonl"
    good = {"creditscore": 600, "geography": "France", "gender": "Male", "age": 40, "tenure": 2,
            "balance": 1.5, "numofproducts": 1, "hascrcard": "yes", "isactivemember": "no",
            "estimatedsalary": 10.0, "predicted_churn": 0.2}  # fmt: skip
    missing = {k: v for k, v in good.items() if k != "tenure"}
    rows.write_text(
        "\n".join(
            [
                json.dumps(good),
                "{not json",
                json.dumps({**good, "age": "old"}),
                json.dumps(missing),
                json.dumps([1, 2]),
                '{"a":' * 5000 + "1" + "}" * 5000,  # past json's recursion limit
                json.dumps({**good, "age": "41"}),
            ]
        )
    )
    done = cli(
        "publish", str(rows), "--project", "bank_churn", "--model", "bank_churn", *to(fiddler)
    )
    assert done.returncode == 1
    assert "line 2: malformed JSON" in done.stderr
    assert "line 3, column 'age': 'old' is not a number" in done.stderr
    assert "line 4: missing column(s) 'tenure'" in done.stderr
    assert "line 5: a line must hold a JSON object" in done.stderr
    assert "line 6: malformed JSON" in done.stderr
    assert "bad rows     5" in done.stdout
    assert [e["age"] for e in fiddler.events()] == [40, 41]


def test_an_unterminated_quote_is_traced_to_its_line(tmp_path: Path, fiddler: Emulator) -> None:
    rows = tmp_path / "events.csv"
    rows.write_text('row_id,x\ne1,1\ne2,2"\ne3,3\ne4,"4\ne5,5\n')
    done = cli("publish", str(rows), "--project", "p", "--model", "m", *to(fiddler))
    assert done.returncode == 1
    assert "line 3, column 'x': '2\"' is not a number" in done.stderr  # the next rows go on
    assert "line 5: malformed CSV: unexpected end of data" in done.stderr
    assert "(a quote opened in this row never closes)" in done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["e1", "e3"]


def test_csv_lines_are_counted_as_a_reader_sees_them(tmp_path: Path, fiddler: Emulator) -> None:
    """Blank lines count in the line numbers; a field may be as large as an event; a name twice
    in the header stops the file (each row would keep one of its values only)."""
    rows = tmp_path / "events.csv"
    large = "y" * 300_000
    rows.write_text(f"row_id,x\ne1,1\n\n\ne2,zz\ne3\ne4,4\n\ne5,{large}\n")
    done = cli("publish", str(rows), "--project", "p", "--model", "m", *to(fiddler))
    assert done.returncode == 1
    assert "line 5, column 'x': 'zz' is not a number" in done.stderr
    assert "line 6: too few fields: no value for ['x']" in done.stderr
    assert "a missing quote" not in done.stderr
    assert "line 9, column 'x'" in done.stderr  # typed like any value, not refused as large
    assert "field limit" not in done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["e1", "e4"]
    trailing = tmp_path / "trailing.csv"  # a spreadsheet's trailing commas: no columns
    trailing.write_text("row_id,x,,\ne6,6,,\n")
    done = cli("publish", str(trailing), "--project", "p", "--model", "m", *to(fiddler))
    assert done.returncode == 0, done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["e1", "e4", "e6"]
    twice = tmp_path / "twice.csv"
    twice.write_text("row_id,x,x\nr1,1,2\n")
    done = cli("publish", str(twice), "--project", "p", "--model", "m", *to(fiddler))
    assert done.returncode == 1
    assert "line 1: the header names ['x'] more than once" in done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["e1", "e4", "e6"]


def test_a_server_that_takes_nothing_stops_the_publish_at_its_timeout(
    tmp_path: Path, fiddler: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """Run in this process, to give it a small queue. The lookups answer, the events
    requests hang: publishing stops once the queue stays full for --timeout, and the summary
    says what was not sent and what was dropped, without waiting the close's own 10 s."""
    rows = tmp_path / "events.csv"  # each row on two lines: rows are counted, not lines
    rows.write_text("row_id,x\n" + "".join(f'"r{i}\nz",{i}\n' for i in range(1000)))
    small = functools.partial(cli_module.PublisherConfig, max_queue_events=100, linger=0.01)
    monkeypatch.setattr(cli_module, "PublisherConfig", small)
    fiddler.set_faults(script=["hang"] * 20)  # the lookups answer, the events requests hang
    code = cli_module.main(["publish", str(rows), "--project", "p", "--model", "m",
                            *to(fiddler), "--timeout", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    stopped = re.search(r"stopped at line (\d+): .*; ([\d,]+) row\(s\) from there on not sent", err)
    assert stopped is not None, err
    line, unsent = int(stopped[1]), int(stopped[2].replace(",", ""))
    assert unsent == 1000 - (line - 2) // 2  # the rows from that line (the header is line 1)
    assert re.search(rf"not sent\s+{unsent:,}", out)
    dropped = int(re.search(r"dropped\s+([\d,]+)", out)[1].replace(",", ""))  # type: ignore[index]
    assert dropped + unsent == 1000  # every row: in flight or queued, dropped at the close


def test_timeouts_must_be_positive_numbers(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("publish", "replay"):
        for value in ("-1", "0", "nan", "inf", "soon"):
            code, said = refusal(capsys, command, str(tmp_path), "--timeout", value)
            assert code == 2
            assert f"'{value}' is not a positive number of seconds" in said


def test_a_json_array_is_named_as_such(tmp_path: Path, fiddler: Emulator) -> None:
    rows = tmp_path / "events.json"
    rows.write_text(json.dumps([{"row_id": "r1", "x": 1}, {"row_id": "r2", "x": 2}], indent=2))
    done = cli("publish", str(rows), "--project", "p", "--model", "m", *to(fiddler))
    assert done.returncode == 1
    assert "line 1: the file holds a JSON array, not JSON Lines" in done.stderr
    assert "bad rows     1" in done.stdout
    lines = tmp_path / "events.jsonl"  # a first line that is an array, whole: one bad row
    lines.write_text('[1, 2]\n{"row_id": "r3", "x": 3}\n')
    done = cli("publish", str(lines), "--project", "p", "--model", "m", *to(fiddler))
    assert "line 1: a line must hold a JSON object, not list" in done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["r3"]


def test_a_wrong_name_or_file_stops_with_a_clear_message(tmp_path: Path, fiddler: Emulator) -> None:
    wrong = cli("publish", str(EXAMPLE), "--project", "bank_churn", "--model", "nope", *to(fiddler))
    assert wrong.returncode == 2
    assert f"model 'nope' not found in project 'bank_churn' at {fiddler.url}" in wrong.stderr
    absent = cli("publish", "nowhere.csv", "--project", "p", "--model", "m", *to(fiddler))
    assert (absent.returncode, "no such file: nowhere.csv" in absent.stderr) == (2, True)
    text = tmp_path / "events.txt"
    text.write_text("x")
    odd = cli("publish", str(text), "--project", "p", "--model", "m", *to(fiddler))
    assert (odd.returncode, "unknown format 'txt'" in odd.stderr) == (2, True)
    assert fiddler.count() == 0


def test_updates_from_a_file_join_their_events(tmp_path: Path, fiddler: Emulator) -> None:
    labels = tmp_path / "labels.csv"
    labels.write_text("event_id,churn\nevt-000000,yes\nevt-000001,no\n")
    first = cli(
        "publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn", *to(fiddler)
    )
    assert first.returncode == 0, first.stderr
    second = cli("publish", str(labels), "--project", "bank_churn", "--model", "bank_churn",
                 "--update", *to(fiddler))  # fmt: skip
    assert second.returncode == 0, second.stderr
    joined = {e["event_id"]: e.get("churn") for e in fiddler.events()[:2]}
    assert joined == {"evt-000000": "yes", "evt-000001": "no"}
    assert fiddler.count() == 5000


def test_parquet(tmp_path: Path, fiddler: Emulator) -> None:
    path = tmp_path / "events.parquet"
    pq.write_table(
        pa.table({"event_id": ["p1", "p2"], "age": [30, None], "balance": [1.0, 2.5]}), path
    )
    done = cli(
        "publish", str(path), "--project", "bank_churn", "--model", "bank_churn", *to(fiddler)
    )
    assert "bad rows     2" in done.stdout  # the model's other inputs are missing
    assert "missing column(s) 'creditscore'" in done.stderr
    update = cli("publish", str(path), "--project", "bank_churn", "--model", "bank_churn",
                 "--update", *to(fiddler))  # fmt: skip
    assert update.returncode == 0, update.stderr
    assert fiddler.pending_updates() == [  # updates of events never sent: not events
        {"event_id": "p1", "age": 30, "balance": 1.0},
        {"event_id": "p2", "age": None, "balance": 2.5},
    ]
    assert fiddler.events() == []


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    with emulator_process(
        "--db", str(tmp_path / "served.db"), "--error-503", "0.3", "--seed", "1", token="t0k3n"
    ) as url:
        yield url


def test_serve_with_faults_then_inspect_by_url(served: str) -> None:
    done = cli("publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn",
               "--url", served, "--token", "t0k3n")  # fmt: skip
    assert done.returncode == 0, done.stderr  # through the injected 503s, by retrying
    assert "delivered    5,000" in done.stdout
    shown = cli("inspect", "--url", served, "--token", "t0k3n", "--events", "1")
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.startswith("bank_churn/bank_churn: 5,000 events, 5,000 distinct ids")
    for asked in ([], ["--events", "1"]):  # a name that is not served, whatever is asked
        mistyped = cli("inspect", "--url", served, "--token", "t0k3n", "--model", "typo", *asked)
        assert mistyped.returncode == 2
        assert "no model bank_churn/typo (bank_churn/bank_churn" in mistyped.stderr


def test_rows_the_server_would_refuse_are_refused_one_by_one(
    tmp_path: Path, fiddler: Emulator
) -> None:
    rows = tmp_path / "events.jsonl"
    good = {"event_id": "g", "age": 1}
    rows.write_text(
        "\n".join(
            json.dumps(r)
            for r in (good, {"event_id": 12345, "age": 2}, {"event_id": "big", "age": 2**70})
        )
    )
    done = cli(
        "publish", str(rows), "--project", "bank_churn_v2_missing", "--model", "x", *to(fiddler)
    )
    assert done.returncode == 2  # (a wrong project first: nothing is read)
    done = cli(
        "publish", str(rows), "--project", "bank_churn", "--model", "bank_churn_v2", *to(fiddler)
    )
    assert "line 2, column 'event_id': expected str, got int 12345" in done.stderr
    assert "line 3" in done.stderr  # an integer JSON cannot carry: a bad row, not a crash
    assert "Traceback" not in done.stderr
    assert [e["event_id"] for e in fiddler.events("bank_churn", "bank_churn_v2")] == ["g"]


def test_csv_encodings(tmp_path: Path, fiddler: Emulator) -> None:
    rows = tmp_path / "events.csv"
    rows.write_bytes(b"\xef\xbb\xbfrow_id,x\nr1,1\nr2,\xff2\nr3,3\n")  # a BOM, then a bad byte
    done = cli("publish", str(rows), "--project", "p", "--model", "m", *to(fiddler))
    assert "line 3, column 'x'" in done.stderr
    assert [e["row_id"] for e in fiddler.events("p", "m")] == ["r1", "r3"]


def test_updates_need_ids(tmp_path: Path, fiddler: Emulator) -> None:
    rows = tmp_path / "labels.csv"
    rows.write_text("event_id,churn\n,yes\ne2,no\n")
    done = cli("publish", str(rows), "--project", "bank_churn", "--model", "bank_churn",
               "--update", *to(fiddler))  # fmt: skip
    assert "line 2, column 'event_id': an update needs an event id" in done.stderr
    assert fiddler.pending_updates() == [{"event_id": "e2", "churn": "no"}]
    no_id = cli("publish", str(rows), "--project", "p", "--model", "noid", "--update", *to(fiddler))
    assert no_id.returncode == 2
    assert "model 'noid' has no event id column" in no_id.stderr


def test_unreadable_inputs_stop_with_a_message(
    tmp_path: Path, fiddler: Emulator, capsys: pytest.CaptureFixture[str]
) -> None:
    corrupt = tmp_path / "events.parquet"
    corrupt.write_bytes(b"PAR1 not really")
    done = cli("publish", str(corrupt), "--project", "p", "--model", "m", *to(fiddler))
    assert (done.returncode, "cannot read" in done.stderr) == (2, True)
    not_db = tmp_path / "not.db"
    not_db.write_text("hello")
    code, said = refusal(capsys, "inspect", "--db", str(not_db))
    assert (code, "is not an emulator database" in said) == (2, True)
    code, said = refusal(capsys, "serve", "--db", str(not_db), "--port", "0")
    assert (code, "is not an emulator database" in said) == (2, True)
    other = tmp_path / "other.db"  # somebody's SQLite: looked at, left as it was
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    code, said = refusal(capsys, "inspect", "--db", str(other))
    assert (code, "is not an emulator database" in said) == (2, True)
    assert other.read_bytes() == before
    emulator_db = tmp_path / "emulator.db"
    Store(str(emulator_db)).close()
    code, said = refusal(capsys, "inspect", "--db", str(emulator_db), "--model", "typo")
    assert (code, "no model bank_churn/typo" in said) == (2, True)
    unanswered = cli(
        "publish", str(EXAMPLE), "--project", "p", "--model", "m",
        "--url", "http://127.0.0.1:1", "--token", "t", "--timeout", "1",
    )  # fmt: skip
    assert unanswered.returncode == 2
    assert "cannot use http://127.0.0.1:1: no answer in 1 s" in unanswered.stderr
    nowhere = cli(
        "publish", str(EXAMPLE), "--project", "p", "--model", "m", "--db", "/nonexistent/x.db"
    )
    assert (nowhere.returncode, "cannot open the emulator's database" in nowhere.stderr) == (
        2,
        True,
    )
    for finished in (done, nowhere, unanswered):  # (the others ran here: a traceback fails)
        assert "Traceback" not in finished.stderr


def test_serve_needs_only_the_server_extra(tmp_path: Path) -> None:
    # rich (the cli extra) made unimportable, as in an install of fiddler-async[server]
    (tmp_path / "rich.py").write_text("raise ImportError('not installed')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), *sys.path])}
    server = subprocess.Popen(
        [sys.executable, "-m", "fiddler_async.cli", "serve", "--port", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        assert server.stdout is not None
        ready, _, _ = select.select([server.stdout], [], [], 30)
        assert ready, "no banner in 30 s"
        banner = server.stdout.readline().decode()
        assert banner.startswith("Fiddler emulator on http://127.0.0.1:"), banner
        url = banner.split()[3]  # port 0: the one it was given
        # Announced once it listens: the first request is answered, no retry needed.
        answer = httpx.get(
            f"{url}/v3/server-info", headers={"Authorization": "Bearer emulator-token"}
        )
        assert answer.status_code == 200
    finally:
        server.terminate()
        _, errors = server.communicate(timeout=10)
    assert b"Traceback" not in errors


def test_serve_on_a_taken_port_says_so_and_announces_nothing() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        refused = cli("serve", "--port", str(taken.getsockname()[1]))
    assert refused.returncode == 2
    assert "cannot listen on 127.0.0.1:" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr
    assert "Fiddler emulator on" not in refused.stdout


def test_a_server_that_cannot_start_says_why(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError) as failed,
        emulator_process("--models", str(tmp_path / "nowhere.toml")),
    ):
        pass
    assert "the emulator did not start (exit code 2)" in str(failed.value)
    assert "cannot use the models file" in str(failed.value)


def test_serve_stops_while_a_request_hangs() -> None:
    with emulator_process("--count-only") as url:
        headers = {"Authorization": "Bearer emulator-token"}
        httpx.put(f"{url}/_emulator/faults", json={"script": ["hang"]}, headers=headers)
        inspect = cli("inspect", "--url", url, "--token", "emulator-token")
        assert inspect.returncode == 0, inspect.stderr
        assert "- distinct ids" in inspect.stdout  # count-only: not known
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v3/events", json={}, headers=headers, timeout=0.5)
    # Leaving the block terminated the server and waited for it (10 s at most): it stopped.


def test_file_integers_are_read_exactly() -> None:
    """Text of an int column, read exactly (through a float, 2**53 + 1 would become 2**53);
    past 64 bits, no JSON reader takes it: an error naming the column."""
    types = {"n": "int"}
    assert coerce_row(1, {"n": "9007199254740993"}, types) == {"n": 9007199254740993}
    assert coerce_row(1, {"n": " 38.0 "}, types) == {"n": 38}
    assert coerce_row(1, {"n": "1e3"}, types) == {"n": 1000}
    for text in ("18446744073709551616", "1e1000000000", "1.5"):
        with pytest.raises(RowError, match="column 'n'"):
            coerce_row(7, {"n": text}, types)


def test_file_times_are_epoch_digits_or_text_that_reads_as_a_time() -> None:
    """A CSV cell is text: epoch milliseconds come as digits, and are a time too."""
    types = {"at": "timestamp"}
    for text in ("1700000000000", "1700000000000.5", "2024-01-02 03:04:05", "2024-01-02T03:04Z"):
        assert coerce_row(1, {"at": text}, types) == {"at": text}
    assert coerce_row(1, {"at": "02/01/2024"}, types, ts_format="%d/%m/%Y")
    for text in ("soon", "<built-in method now>", "02/01/2024"):
        with pytest.raises(RowError, match="column 'at': expected a time"):
            coerce_row(7, {"at": text}, types)
    # A date that does not exist, or text after one, is not a time (the first digits were
    # enough); epoch seconds are not milliseconds, unless the model's times are seconds.
    for text in ("2024-01-01 10:00:00 UTC", "2024-01-01t10:00:00z", "2024-01-01T10"):
        assert coerce_row(1, {"at": text}, types) == {"at": text}  # as exports write them
    for text in ("2024-13-45 99:99", "2024-02-30", "2024-01-01garbage", "2024-01-01T24:00",
                 "2024-01-01T10:00+99:99", "2024-01-01 Z"):  # fmt: skip
        with pytest.raises(RowError, match="column 'at': expected a time"):
            coerce_row(7, {"at": text}, types)
    with pytest.raises(RowError, match="1704067200 looks like epoch seconds"):
        coerce_row(7, {"at": "1704067200"}, types)
    assert coerce_row(1, {"at": "1704067200"}, types, ts_format="epoch seconds")
    assert coerce_row(1, {"at": "1704067200"}, types, ts_format="%Y")  # (not asked)


def test_inspect_by_url_shows_the_model_served_when_none_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    models = tmp_path / "models.toml"
    models.write_text(
        '[[models]]\nproject = "fraud"\nname = "detector"\nevent_id_col = "event_id"\n'
        '[models.columns]\nevent_id = "str"\namount = "float"\n'
    )
    with emulator_process("--models", str(models), token="t0k3n") as url:
        with httpx.Client(base_url=url, headers={"Authorization": "Bearer t0k3n"}) as client:
            model_id = client.get("/v3/models").json()["data"]["items"][0]["id"]
            body = {
                "source": {"type": "EVENTS", "events": [{"event_id": "f1", "amount": 9.5}]},
                "model_id": model_id,
                "env_type": "PRODUCTION",
                "env_name": None,
            }
            assert client.post("/v3/events", json=body).is_success
        # (A proxy in the environment is not used for a loopback URL: the token stays here.)
        monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")  # nothing listens there
        shown = cli("inspect", "--url", url, "--token", "t0k3n", "--events", "1")
    assert shown.returncode == 0, shown.stderr
    assert '"event_id": "f1"' in shown.stdout
    db = tmp_path / "served.db"  # the same model's events in a database, looked at by path
    store = Store(str(db))
    store.insert(model_id, "PRODUCTION", None, "event_id", [{"event_id": "f1", "amount": 9.5}])
    store.close()
    unnamed = cli("inspect", "--db", str(db))  # without --models: not in the built-in ones
    assert unnamed.returncode == 0, unnamed.stderr
    assert "also holds 1 events of models not in the built-in models" in unnamed.stderr
    named = cli("inspect", "--db", str(db), "--models", str(models), "--events", "1")
    assert "fraud/detector: 1 events" in named.stdout
    assert "also holds" not in named.stderr


def test_ctrl_c_stops_the_publish_and_still_says_what_became_of_every_row(
    tmp_path: Path, fiddler: Emulator
) -> None:
    """The first Ctrl-C stops reading and sends what is queued; the second drops it. The
    summary comes all the same, and accounts for every row: delivered, dropped (counted) or
    not sent."""
    rows = tmp_path / "many.csv"
    header, *lines = EXAMPLE.read_text().splitlines()
    rows.write_text("\n".join([header, *(lines * 40)]) + "\n")  # 200,000 rows
    fiddler.set_faults(latency=3)  # each request takes a while: the queue fills
    process = subprocess.Popen(
        [sys.executable, "-m", "fiddler_async.cli", "publish", str(rows),
         "--project", "bank_churn", "--model", "bank_churn", *to(fiddler)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not fiddler.count() and time.monotonic() < deadline:  # publishing is under way
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        # The second Ctrl-C ends the sending at once, the requests under way too: the first
        # one's flush alone would go on for 10 s (each answer takes 3).
        out, err = process.communicate(timeout=8)
    finally:
        process.kill()
    assert process.returncode == 130, err
    assert "Interrupted: sending what is queued" in err
    assert "interrupted (Ctrl-C):" in err
    figures = {
        name: int(value.replace(",", ""))
        for name, value in re.findall(
            r"^  (delivered|dropped|not sent|failed) +([\d,]+)", out, re.M
        )
    }
    assert figures["not sent"] > 0
    assert figures["dropped"] > 0
    assert figures["delivered"] + figures["dropped"] + figures["not sent"] == 200_000
    assert figures["delivered"] <= fiddler.count() <= figures["delivered"] + figures["dropped"]


def test_replay_leaves_a_directory_that_is_no_spool_as_it_was(
    tmp_path: Path, fiddler: Emulator
) -> None:
    """A mistyped directory: neither its files (an old ``*.tmp`` among them) nor its mode are
    touched; an empty one has nothing to replay."""
    documents = tmp_path / "documents"
    documents.mkdir(mode=0o755)
    draft = documents / "draft.tmp"
    draft.write_text("notes")
    os.utime(draft, (time.time() - 3600, time.time() - 3600))
    refused = cli("replay", str(documents), *to(fiddler))
    assert refused.returncode == 2
    assert "is not a spool directory" in refused.stderr
    assert sorted(p.name for p in documents.iterdir()) == ["draft.tmp"]
    assert stat.S_IMODE(documents.stat().st_mode) == 0o755
    empty = tmp_path / "empty"
    empty.mkdir(mode=0o755)
    nothing = cli("replay", str(empty), *to(fiddler))
    assert nothing.returncode == 0, nothing.stderr
    assert "nothing to replay" in nothing.stdout
    assert (list(empty.iterdir()), stat.S_IMODE(empty.stat().st_mode)) == ([], 0o755)


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("notaurl", "must be an http:// or https:// URL"),
        ("http://10.0.0.5", "--allow-insecure-http"),
        ("http://127.0.0.1:99999", "port 99999 is not 1 to 65535"),
    ],
)
def test_a_url_the_commands_cannot_use_is_said_plainly(url: str, said: str) -> None:
    for command in (
        ["publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn"],
        ["replay", str(EXAMPLE.parent)],  # (refused before the directory is looked at)
    ):
        done = cli(*command, "--url", url, "--token", "t")
        assert done.returncode == 2, done.stderr
        assert said in done.stderr
        assert "Traceback" not in done.stderr


def test_numbers_out_of_range_are_refused_by_the_parser(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, said = refusal(capsys, "serve", "--port", "65537")  # used to wrap around to port 1
    assert (code, "not a whole number 0 to 65535" in said) == (2, True)
    code, said = refusal(capsys, "inspect", "--events", "-1")  # used to print every event
    assert (code, "not a whole number 0 or more" in said) == (2, True)


def test_a_database_of_someone_else_is_not_written_to(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs.db"
    with sqlite3.connect(theirs) as db:
        db.execute("CREATE TABLE mine (x)")
    publish = cli(
        "publish", str(EXAMPLE), "--project", "bank_churn", "--model", "bank_churn",
        "--db", str(theirs),
    )  # fmt: skip
    assert publish.returncode == 2
    assert "holds other tables (mine)" in publish.stderr
    serve = cli("serve", "--port", "0", "--db", str(theirs))
    assert (serve.returncode, "holds other tables (mine)" in serve.stderr) == (2, True)
    with sqlite3.connect(theirs) as db:
        assert [name for (name,) in db.execute("SELECT name FROM sqlite_master")] == ["mine"]


def test_a_server_that_never_answers_is_given_up_before_the_timeout(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A wrong URL: the lookup is given LOOKUP_TIMEOUT (15 s), not all of --timeout (120 s).
    monkeypatch.setattr(cli_module, "LOOKUP_TIMEOUT", 0.5)
    code, said = refusal(
        capsys, "publish", str(EXAMPLE), "--project", "p", "--model", "m",
        "--url", "http://127.0.0.1:1", "--token", "t",
    )  # fmt: skip
    assert code == 2
    assert "cannot use http://127.0.0.1:1: no answer in 0.5 s" in said


def test_files_are_read_alike_whatever_their_format(tmp_path: Path) -> None:
    """A name twice is refused in every format (a row would keep one of its values); a
    Parquet value Python cannot hold is its row's problem, not its 10,000-row batch's; a
    file's rows are counted as records (quoted line breaks, bare CR line ends)."""
    twice = tmp_path / "twice.parquet"
    pq.write_table(pa.Table.from_arrays([pa.array([1]), pa.array([2])], names=["x", "x"]), twice)
    jsonl = tmp_path / "twice.jsonl"
    jsonl.write_text('{"x": 1, "x": 100}\n{"x": 2, "y": {"z": 1, "z": 2}}\n{"x": 3}\n')
    far = tmp_path / "far.parquet"
    micros = [1_700_000_000_000_000, 10**18, 1_700_000_000_000_001]  # 10**18: year 33658
    pq.write_table(pa.table({"at": pa.array(micros, type=pa.timestamp("us"))}), far)

    def rows(path: Path) -> list[Any]:
        with path.open("rb") as stream:
            return [
                row if isinstance(row, dict) else str(row)
                for _, row in read_rows(stream, file_format(path))
            ]

    assert rows(twice) == ["line 1: the file names the columns ['x'] more than once"]
    read = rows(jsonl)
    assert read[2] == {"x": 3}
    assert "['x'] named twice" in read[0]
    assert "['z'] named twice" in read[1]
    far_rows = rows(far)
    assert far_rows[0] == {"at": dt.datetime(2023, 11, 14, 22, 13, 20)}
    assert far_rows[1].startswith("line 2: cannot read this row")
    assert far_rows[2] == {"at": dt.datetime(2023, 11, 14, 22, 13, 20, 1)}
    for text in ("x,y\r1,2\r3,4\r", 'x,y\n1,"a\nb"\n\n3,4\n'):
        (tmp_path / "rows.csv").write_text(text, newline="")
        assert count_rows(tmp_path / "rows.csv") == 2


def test_a_file_that_breaks_partway_sends_what_was_read_and_says_so(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: Any, tmp_path: Path
) -> None:
    """A damaged Parquet page, a disk error: the command ended in a traceback, without its
    summary, after it had sent events."""
    path = tmp_path / "events.csv"
    path.write_text("row_id,x\n" + "".join(f"r{i},{i}\n" for i in range(2500)))

    def breaking(stream: Any, fmt: str) -> Iterator[tuple[int, dict[str, Any]]]:
        for i in range(2500):
            if i == 2200:
                raise OSError("Corrupt snappy compressed data")
            yield i + 2, {"row_id": f"r{i}", "x": str(i)}

    monkeypatch.setattr(cli_module, "read_rows", breaking)
    code = cli_module.main(["publish", str(path), "--project", "p", "--model", "m", *to(fiddler)])
    out, err = capsys.readouterr()
    assert code == 1
    assert "Traceback" not in err
    assert "after row 2,200: Corrupt snappy compressed data; 300 row(s) not read" in err
    assert re.search(r"delivered\s+2,200", out)  # every row read before the failure
    assert len(fiddler.events("p", "m")) == 2200


def test_a_slow_server_that_keeps_taking_events_is_given_them_all(
    tmp_path: Path, fiddler: Emulator, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """--timeout bounds a silence of the server, not the whole flush: a server taking
    events steadily, slower than the queue fills, lost the tail of the file."""
    path = tmp_path / "events.csv"
    path.write_text("row_id,x\n" + "".join(f"r{i},{i}\n" for i in range(1200)))
    small = functools.partial(cli_module.PublisherConfig, max_batch_events=100, max_in_flight=1)
    monkeypatch.setattr(cli_module, "PublisherConfig", small)
    fiddler.set_faults(latency=0.2)  # 12 requests, one at a time: well past --timeout 1
    code = cli_module.main(["publish", str(path), "--project", "p", "--model", "m",
                            *to(fiddler), "--timeout", "1"])  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0, err
    assert re.search(r"delivered\s+1,200", out)
    assert len(fiddler.events("p", "m")) == 1200

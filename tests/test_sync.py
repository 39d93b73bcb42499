"""``Publisher``, for synchronous code: the same calls without await, from many threads, on a
loop thread of its own (asyncio or trio); a bounded flush at interpreter exit; safe to fork."""

from __future__ import annotations

import contextlib
import faulthandler
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from fiddler_async import (
    ConfigurationError,
    DeliveryFailure,
    EventEncodeError,
    Publisher,
    PublisherClosedError,
    QueueFullError,
)
from fiddler_async import sync as sync_module
from fiddler_async.emulator import Emulator
from fiddler_async.stats import FlushResult

from .conftest import ONE_SLOT_FULL_QUEUE, bank_event, config
from .in_process import TOKEN


@pytest.fixture(params=["asyncio", "trio"])
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def sync_publisher(emulator: Emulator, backend: str, **changes: Any) -> Publisher:
    on_error = changes.pop("on_error", None)
    return Publisher(
        emulator.url,
        TOKEN,
        config=config(**changes),
        on_error=on_error,
        backend=backend,  # type: ignore[arg-type]
    )


def test_many_threads_publish_and_every_event_arrives(fiddler: Emulator, backend: str) -> None:
    ids: list[list[str]] = [[] for _ in range(8)]

    def work(worker: int) -> None:
        for i in range(1000):
            ids[worker].append(
                pub.publish_event("bank_churn", "bank_churn", bank_event(worker * 1000 + i))
            )

    with sync_publisher(fiddler, backend) as pub:
        threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        result = pub.flush(30)
        stats = pub.stats()
    assert result.complete
    assert (stats.accepted, stats.delivered, stats.dropped) == (8000, 8000, {})
    published = [event_id for worker in ids for event_id in worker]
    assert len(set(published)) == 8000
    assert sorted(e["event_id"] for e in fiddler.events()) == sorted(published)


def test_errors_reach_the_calling_thread(fiddler: Emulator, backend: str) -> None:
    failures: list[DeliveryFailure] = []
    with sync_publisher(fiddler, backend, on_error=failures.append) as pub:
        pub.publish_event("bank_churn", "bank_churn", bank_event(0))  # the destination is set up
        with pytest.raises(EventEncodeError, match="balance") as caught:
            pub.publish_event("bank_churn", "bank_churn", {**bank_event(1), "balance": object()})
        assert caught.value.field == "balance"
        bad = {**bank_event(2), "age": "forty"}  # the server refuses it
        ids = pub.publish_events_batch("bank_churn", "bank_churn", [bank_event(3), bad])
        pub.flush(30)
        assert pub.stats().accepted == 3
    assert pub.stats().delivered == 2
    assert [f.event_ids for f in failures] == [(ids[1],)]
    with pytest.raises(PublisherClosedError):
        pub.publish_event("bank_churn", "bank_churn", bank_event(4))
    assert pub.close().complete  # closing again is harmless


def test_bad_timeouts_are_refused_before_anything_closes(fiddler: Emulator, backend: str) -> None:
    """A NaN exit_timeout made the exit's close fail and drop the queue; a NaN close()
    closed the publisher and dropped it too."""
    for bad in ("5", math.nan):
        with pytest.raises(ConfigurationError, match="exit_timeout must be a number"):
            Publisher(fiddler.url, TOKEN, exit_timeout=bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="on_error must be a callable"):
        Publisher(fiddler.url, TOKEN, on_error="log")  # type: ignore[arg-type]
    with sync_publisher(fiddler, backend) as pub:
        pub.publish_event("bank_churn", "bank_churn", bank_event(0))
        with pytest.raises(ValueError, match="timeout must be a number of seconds, got NaN"):
            pub.close(math.nan)
        with pytest.raises(ValueError, match="timeout must be a number of seconds, got NaN"):
            pub.flush(math.nan)
        assert pub.close(10).delivered == 1
    assert len(fiddler.events()) == 1


def test_the_raise_policy_raises_in_the_caller(fiddler: Emulator, backend: str) -> None:
    fiddler.set_faults(script=["hang"])  # the one request allowed in flight is held
    with sync_publisher(
        fiddler, backend, overflow="raise", max_queue_events=5, max_in_flight=1, linger=3600
    ) as pub:
        for i in range(5):  # a full queue: sent at once, and held
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        deadline = time.monotonic() + 10
        while pub.stats().in_flight_requests != 1 and time.monotonic() < deadline:
            time.sleep(0.005)
        for i in range(5, 10):  # full again, and it stays so
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        with pytest.raises(QueueFullError):
            pub.publish_event("bank_churn", "bank_churn", bank_event(10))
        assert pub.stats().rejected == 1
        pub.close(0.5)


CHILD = """
import sys
from fiddler_async import Publisher, PublisherConfig

url, token, timeout = sys.argv[1], sys.argv[2], float(sys.argv[3])
pub = Publisher(url, token, config=PublisherConfig(linger=3600), exit_timeout=timeout)
for i in range(1000):
    pub.publish_event("bank_churn", "bank_churn", {"customer_id": f"c{i}", "age": 40})
print("published", flush=True)
# no close(): the interpreter's exit flushes, within exit_timeout
"""


def run_script(fiddler: Emulator, script: str, *args: str) -> subprocess.CompletedProcess[str]:
    """``script`` in a Python of its own, given the emulator's URL and token, then ``args``."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script), fiddler.url, TOKEN, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def run_child(fiddler: Emulator, timeout: float) -> subprocess.CompletedProcess[str]:
    return run_script(fiddler, CHILD, str(timeout))


def test_a_script_that_never_closes_is_flushed_at_exit(fiddler: Emulator) -> None:
    child = run_child(fiddler, timeout=30)
    assert child.returncode == 0, child.stderr
    assert fiddler.count() == 1000  # linger was an hour: only the exit flush sent them
    assert child.stderr == ""


def test_the_exit_flush_is_bounded_when_the_backend_hangs(fiddler: Emulator) -> None:
    fiddler.set_faults(script=["hang"])
    child = run_child(fiddler, timeout=0.5)  # the test's own 60 s limit would catch a hang
    assert child.returncode == 0, child.stderr
    assert "closed at interpreter exit" in child.stderr
    assert "1000 dropped" in child.stderr


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forking with threads is the point
def test_a_forked_child_publishes_on_a_fresh_loop(fiddler: Emulator, backend: str) -> None:
    pub = sync_publisher(fiddler, backend, linger=3600)
    for i in range(3):  # queued in the parent when it forks
        pub.publish_event("bank_churn", "bank_churn", bank_event(i))
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            for i in range(5):
                pub.publish_event("bank_churn", "bank_churn", bank_event(100 + i))
            result = pub.close(10)
            code = 0 if result.delivered == 5 else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert pub.close(10).delivered == 3  # the parent still sends its own
    customers = sorted(e["customer_id"] for e in fiddler.events())
    assert customers == ["c0", "c1", "c100", "c101", "c102", "c103", "c104", "c2"]


EXIT_CASES = {
    # New connections at exit (four batches at once) resolve "localhost": asyncio does that
    # in concurrent.futures, which refuses work once the interpreter's exit has begun.
    "a host name": """
pub = Publisher(url.replace("127.0.0.1", "localhost"), token,
                config=PublisherConfig(linger=3600, max_batch_events=250))
for i in range(1000):
    pub.publish_event("bank_churn", "bank_churn", {"customer_id": f"c{i}", "age": 40})
""",
    # Nobody refers to the publisher any more: it must still be closed at exit.
    "a forgotten publisher": """
def forget():
    pub = Publisher(url, token, config=PublisherConfig(linger=3600))
    for i in range(1000):
        pub.publish_event("bank_churn", "bank_churn", {"customer_id": f"c{i}", "age": 40})
forget()
import gc; gc.collect()
""",
    # Made by a thread still running once the main one ended, after the close at exit ran.
    "a publisher made after the exit began": """
import threading
def late():
    threading.main_thread().join()
    pub = Publisher(url, token, config=PublisherConfig(linger=3600))
    for i in range(1000):
        pub.publish_event("bank_churn", "bank_churn", {"customer_id": f"c{i}", "age": 40})
threading.Thread(target=late).start()
""",
}


@pytest.mark.parametrize("case", sorted(EXIT_CASES))
def test_the_exit_flush_reaches_every_publisher(fiddler: Emulator, case: str) -> None:
    script = (
        "import sys\nfrom fiddler_async import Publisher, PublisherConfig\n"
        "url, token = sys.argv[1], sys.argv[2]\n" + EXIT_CASES[case]
    )
    child = run_script(fiddler, script)
    assert child.returncode == 0, child.stderr
    assert fiddler.count() == 1000, child.stderr


def test_a_publisher_made_in_an_exit_hook_is_refused(fiddler: Emulator) -> None:
    """It could send nothing: its thread would die with the interpreter, its events too."""
    script = """
        import atexit, sys
        from fiddler_async import Publisher, PublisherClosedError

        def at_exit():
            try:
                Publisher(sys.argv[1], sys.argv[2])
            except PublisherClosedError as exc:
                print("refused:", exc)

        atexit.register(at_exit)
        """
    child = run_script(fiddler, script)
    assert child.returncode == 0, child.stderr
    assert "refused: the interpreter is exiting" in child.stdout


def hold_the_loop(pub: Publisher, seconds: float) -> None:
    """Keep the publisher's loop thread busy for ``seconds`` (a big batch, say) from now."""
    holding = threading.Event()

    def hold() -> None:
        holding.set()
        time.sleep(seconds)

    assert pub._loop is not None
    pub._loop.call_soon(hold)
    assert holding.wait(10)


def test_a_busy_loop_keeps_the_hand_off_bounded(fiddler: Emulator, backend: str) -> None:
    """The loop's thread is held: publishers keep going, memory does not grow past the
    queue's bound, and what the drop policy pushes out is counted."""
    with sync_publisher(fiddler, backend, max_queue_events=100) as pub:
        hold_the_loop(pub, 1.0)
        for i in range(5000):
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
            assert len(pub._handoff) <= 100
        pub.flush(30)
        stats = pub.stats()
    assert stats.accepted == 5000
    assert stats.dropped["queue_full"] > 0
    assert stats.accepted == stats.delivered + stats.failed + stats.dropped_total


def test_a_blocking_on_error_holds_up_nothing_else(fiddler: Emulator, backend: str) -> None:
    """A plain on_error runs on a thread of its own: while one blocks, other events are
    delivered, stats() answers, and close() keeps its deadline; from the callback, stats()
    works and flush() (which waits for the callbacks) is a clear error."""
    entered, release = threading.Event(), threading.Event()
    seen: list[object] = []

    def blocking_on_error(failure: DeliveryFailure) -> None:
        seen.append(type(pub.stats()).__name__)
        with pytest.raises(RuntimeError, match="wait for itself"):
            pub.flush(1)
        seen.append("flush refused")
        entered.set()
        release.wait(30)

    pub = sync_publisher(fiddler, backend, on_error=blocking_on_error)
    try:
        pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "forty"})
        assert entered.wait(10)  # refused: the callback runs, and blocks
        ids = [pub.publish_event("bank_churn", "bank_churn", bank_event(i)) for i in range(50)]
        deadline = time.monotonic() + 10
        while pub.stats().delivered < 50 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert {e["event_id"] for e in fiddler.events()} == set(ids)  # the others went
        pub.close(0.5)
        assert not release.is_set()  # closed with the callback still blocked
    finally:
        release.set()
    assert seen == ["StatsSnapshot", "flush refused"]


def test_an_on_error_may_publish_and_look_up_but_not_wait_for_reports(
    fiddler: Emulator, backend: str
) -> None:
    """From a plain on_error, the calls that never wait for a report work (under ``block``
    too, where publish_event waits for the loop's answer); flush() and replay_spool(), which
    wait for the callbacks, are a clear error."""
    done = threading.Event()
    seen: list[str] = []

    def on_error(failure: DeliveryFailure) -> None:
        calls: dict[str, Callable[[], object]] = {
            "publish_event": lambda: pub.publish_event("bank_churn", "bank_churn", bank_event(1)),
            "publish_events_batch": lambda: pub.publish_events_batch(
                "bank_churn", "bank_churn", [bank_event(2)]
            ),
            "resolve": lambda: pub.resolve("bank_churn", "bank_churn").name,
            "flush": lambda: pub.flush(1),
            "replay_spool": pub.replay_spool,
        }
        try:
            for name, call in calls.items():
                try:
                    call()
                except RuntimeError as exc:
                    seen.append(f"{name}: {'refused' if 'wait for itself' in str(exc) else exc}")
                else:
                    seen.append(f"{name}: ok")
        finally:
            done.set()

    pub = sync_publisher(fiddler, backend, overflow="block", on_error=on_error)
    pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "forty"})
    assert done.wait(20)
    assert pub.close(10).complete
    assert seen == [
        "publish_event: ok",
        "publish_events_batch: ok",
        "resolve: ok",
        "flush: refused",
        "replay_spool: refused",
    ]
    assert sorted(e["customer_id"] for e in fiddler.events()) == ["c1", "c2"]


def test_an_on_error_waiting_for_room_gives_its_slot_back(fiddler: Emulator, backend: str) -> None:
    """Under ``block``, with one slot, which the failed batch keeps while its plain callback
    runs: the callback publishes into the full queue behind it. Its call, run on the loop,
    carries the callback's report and gives the slot back as it waits for room (else it
    would wait for itself until its block timeout)."""
    go, done, outcome = threading.Event(), threading.Event(), []

    def on_error(failure: DeliveryFailure) -> None:
        go.wait(20)
        try:
            outcome.append(pub.publish_event("bank_churn", "bank_churn", bank_event(99)))
        except Exception as exc:
            outcome.append(exc)
        done.set()

    pub = sync_publisher(fiddler, backend, **ONE_SLOT_FULL_QUEUE, on_error=on_error)
    try:
        pub.resolve("bank_churn", "bank_churn")
        pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "forty"})
        deadline = time.monotonic() + 10
        while pub.stats().failed < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        for i in range(1, 11):  # a full queue behind the callback's slot
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        go.set()
        assert done.wait(20)
    finally:
        go.set()
        pub.close(10)
    assert [type(value) for value in outcome] == [str]  # an id, not QueueFullError
    assert pub.stats().delivered == 11


def close_interrupted(
    pub: Publisher, fiddler: Emulator, kind: type[BaseException], timeout: float
) -> None:
    """Queue 10 events, then close() with a server that never answers, interrupted 0.1 s in
    by a signal handler raising ``kind`` (which the caller gets)."""

    def interrupt(*_: object) -> None:
        raise kind

    for i in range(10):
        pub.publish_event("bank_churn", "bank_churn", bank_event(i))
    fiddler.set_faults(script=["hang"])  # the close's request never gets an answer
    previous = signal.signal(signal.SIGUSR1, interrupt)
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        with pytest.raises(kind):
            pub.close(timeout)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_a_close_cut_short_by_ctrl_c_is_reported_by_the_next(
    fiddler: Emulator, backend: str
) -> None:
    """Ctrl-C in close() (here a signal handler raising): the close went on to its deadline
    on the loop all the same, and the next close() says what it settled, rather than an
    empty success."""

    class Interrupted(Exception):
        pass

    pub = sync_publisher(fiddler, backend, linger=3600)
    close_interrupted(pub, fiddler, Interrupted, 0.5)
    again = pub.close(0.5)
    assert (again.delivered, again.dropped, again.pending) == (0, 10, 0)
    assert pub.stats().dropped == {"shutdown": 10}


def test_a_close_interrupted_by_ctrl_c_goes_on_and_is_waited_for(
    fiddler: Emulator, backend: str
) -> None:
    """Ctrl-C (a BaseException) in close(): it reaches the caller at once, the close goes on
    on the loop to its deadline, and the next close() waits for it and says what it settled.
    (The interrupt used to wait up to 5 s for the loop to stop, then settle for an empty
    result, losing the events without a word when the close's deadline was further.)"""

    class Interrupted(BaseException):  # as KeyboardInterrupt is
        pass

    pub = sync_publisher(fiddler, backend, linger=3600)
    close_interrupted(pub, fiddler, Interrupted, 2)
    assert pub._closing is not None
    assert not pub._closing.is_set()  # still closing, in the background
    assert pub in sync_module._open_publishers  # so the close at exit would wait for it too
    early = pub.close(0.1)  # a shorter wait says it is not over, and does not end it
    assert (early.complete, pub._closing.is_set()) == (False, False)
    again = pub.close(10)
    assert (again.delivered, again.dropped, again.pending) == (0, 10, 0)
    assert pub not in sync_module._open_publishers
    assert pub._loop is not None
    assert not pub._loop.thread.is_alive()  # stopped by the close that saw the end


def test_a_second_close_without_a_deadline_waits_for_the_first(
    fiddler: Emulator, backend: str
) -> None:
    pub = sync_publisher(fiddler, backend, linger=3600)
    for i in range(10):
        pub.publish_event("bank_churn", "bank_churn", bank_event(i))
    fiddler.set_faults(latency=0.3)  # the first close takes a while
    first: list[FlushResult] = []
    closing = threading.Thread(target=lambda: first.append(pub.close(math.inf)))
    closing.start()
    while pub._closing is None:  # the first close has begun
        time.sleep(0.001)
    second = pub.close(math.inf)  # used to be OverflowError (no wait that long)
    closing.join(30)
    assert second == first[0]
    assert second.delivered == 10


@pytest.mark.parametrize("call", ["stats", "flush", "resolve"])
def test_a_call_racing_a_close_hears_that_it_closed(
    fiddler: Emulator, backend: str, call: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A call that found the publisher open, and reaches the loop after a close on another
    thread ended it: stats() and flush() answer as after a close, resolve() raises
    PublisherClosedError (not anyio's "portal is not running")."""
    pub = sync_publisher(fiddler, backend)
    pub.publish_event("bank_churn", "bank_churn", bank_event(0))
    portal = Publisher._portal

    def then_closed(self: Publisher) -> Any:  # the close lands just after the check
        found = portal(self)
        closer = threading.Thread(target=self.close, args=(10,))
        closer.start()
        closer.join()
        return found

    monkeypatch.setattr(Publisher, "_portal", then_closed)
    if call == "stats":
        assert pub.stats().delivered == 1
    elif call == "flush":
        assert pub.flush(5) == FlushResult()
    else:
        with pytest.raises(PublisherClosedError):
            pub.resolve("bank_churn", "bank_churn")


def test_a_busy_loop_keeps_the_hand_off_within_its_bytes(fiddler: Emulator, backend: str) -> None:
    """Big events after small ones, the loop's thread held: each big one pushes out as many
    old ones as it takes to keep the byte bound, not one for one."""
    limit = 8192
    with sync_publisher(fiddler, backend, max_queue_bytes=limit, max_batch_bytes=4096) as pub:
        hold_the_loop(pub, 1.0)
        for i in range(200):
            big = {**bank_event(i), "customer_id": "x" * (3000 if i >= 100 else 10)}
            pub.publish_event("bank_churn", "bank_churn", big)
            assert sum(len(body) for _, body, _ in pub._handoff) <= limit
        pub.flush(30)
        stats = pub.stats()
    assert stats.dropped["queue_bytes"] > 0
    assert stats.accepted == stats.delivered + stats.failed + stats.dropped_total


HUNG_RESOLVER_CHILD = """
import socket, sys, time
real = socket.getaddrinfo
def hung(host, port=None, family=0, type=0, proto=0, flags=0):
    # A resolver that does not answer (glibc gives up after 20 s). Whether the name is an
    # address is answered at once: trio asks that on its loop's own thread.
    name = host.decode() if isinstance(host, bytes) else host
    if name == "fiddler.example.com" and not flags & socket.AI_NUMERICHOST:
        time.sleep(60)
    return real(host, port, family, type, proto, flags)
socket.getaddrinfo = hung
from fiddler_async import Publisher
closed_by = sys.argv[2]
pub = Publisher("https://fiddler.example.com", "t", backend=sys.argv[1], exit_timeout=0.5)
for i in range(10):
    pub.publish_event("p", "11111111-2222-3333-4444-555555555555", {"x": i})
time.sleep(0.3)  # the lookup of the host name is under way, and hangs
if closed_by == "close":
    print(pub.close(0.5).dropped)
"""


@pytest.mark.parametrize("closed_by", ["close", "exit"])
def test_a_hung_host_name_lookup_holds_neither_close_nor_exit(backend: str, closed_by: str) -> None:
    """The lookup's thread is left to end on its own: the close keeps its deadline, and the
    process ends (it would wait a minute for the thread otherwise)."""
    child = subprocess.run(
        [sys.executable, "-c", HUNG_RESOLVER_CHILD, backend, closed_by],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    if closed_by == "close":
        assert child.stdout.split() == ["10"]
    else:
        assert "10 dropped at the deadline" in child.stderr


SIGNAL_CHILD = """
import signal, sys
from fiddler_async import Publisher, PublisherClosedError
url, token = sys.argv[1], sys.argv[2]
for run in range(5):
    pub = Publisher(url, token)
    closed = []
    def on_alarm(signum, frame, pub=pub, closed=closed):
        closed.append(pub.close(10))
        raise SystemExit
    signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, 0.2 + 0.05 * run)
    published = 0
    try:
        while True:  # the handler interrupts this thread, maybe inside a publish
            pub.publish_event("bank_churn", "bank_churn", {"customer_id": "c", "age": 1})
            published += 1
    # (Python swallows an exception a handler raises while a weakref callback runs: then the
    # next publish after the close says it is closed.)
    except (SystemExit, PublisherClosedError):
        result = closed[0]
        print(published, result.complete and not (result.failed or result.dropped), flush=True)
"""


@pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="needs signal.setitimer")
def test_a_signal_handler_may_close_while_its_thread_publishes(fiddler: Emulator) -> None:
    """The usual shutdown hook: the handler runs on the publishing thread, perhaps inside
    publish_event. Closing there must not wait for what that interrupted call holds."""
    child = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(SIGNAL_CHILD), fiddler.url, TOKEN],
        capture_output=True,
        text=True,
        timeout=120,  # a deadlock fails here
        check=False,
    )
    assert child.returncode == 0, child.stderr
    runs = [line.split() for line in child.stdout.splitlines()]
    assert [closed_whole for _, closed_whole in runs] == ["True"] * 5
    # Every event published before the signal arrived was delivered, and perhaps the one it
    # interrupted (queued before its id was returned).
    published = sum(int(count) for count, _ in runs)
    assert published <= fiddler.count() <= published + 5


def test_stats_add_up_while_closing_and_a_late_close_says_what_is_pending(
    fiddler: Emulator, backend: str
) -> None:
    pub = sync_publisher(fiddler, backend, linger=3600, max_batch_events=50)
    for i in range(100):
        pub.publish_event("bank_churn", "bank_churn", bank_event(i))
    fiddler.set_faults(script=["hang"])  # the close's first request never gets an answer
    closing = threading.Thread(target=pub.close, args=(2.0,))
    closing.start()
    while pub._closing is None:  # the first close has begun
        time.sleep(0.001)
    late = pub.close(0.2)  # gives up before the first
    snapshots = [pub.stats() for _ in range(50)]
    closing.join(30)
    assert late.pending > 0
    assert not late.complete
    for s in snapshots:
        assert s.accepted == s.delivered + s.failed + s.spooled + s.dropped_total + s.pending


def test_closing_cancels_calls_other_threads_wait_for(backend: str) -> None:
    """A lookup waiting on a server that never answers: close() ends it (the caller hears
    PublisherClosedError) and stops the loop's thread, rather than leave both running."""
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    asked = threading.Event()
    held: list[socket.socket] = []

    def take_and_never_answer() -> None:
        connection, _ = silent.accept()
        held.append(connection)
        connection.recv(65536)  # the lookup's request arrived
        asked.set()

    threading.Thread(target=take_and_never_answer, daemon=True).start()
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"
    pub = Publisher(url, TOKEN, config=config(request_timeout=30), backend=backend)  # type: ignore[arg-type]
    outcome: list[BaseException] = []

    def look_up() -> None:
        try:
            pub.resolve("bank_churn", "bank_churn")
        except BaseException as exc:  # what the caller hears is the point
            outcome.append(exc)

    waiting = threading.Thread(target=look_up)
    waiting.start()
    assert asked.wait(30)
    pub.close(1)
    stopped = not any(t.name == "fiddler_async" and t.is_alive() for t in threading.enumerate())
    waiting.join(60)
    for sock in (*held, silent):
        sock.close()
    assert stopped  # when close() returned
    assert [type(e) for e in outcome] == [PublisherClosedError]


@pytest.mark.parametrize("when", ["before", "after"])
def test_a_close_inside_a_publish_leaves_that_publish_honest(
    fiddler: Emulator, backend: str, when: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler that closes and returns, run while publish_event is inside its hand-off
    (the signal sent from there): an event the close took is published (its id returned);
    one that came after it raises PublisherClosedError; either way the books balance."""
    pub = sync_publisher(fiddler, backend)
    pub.publish_event("bank_churn", "bank_churn", bank_event(0))  # the route known: fast path
    pub.flush(10)
    closed: list[Any] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: closed.append(pub.close(5)))
    hand_off = pub._hand_off

    def interrupted(item: Any) -> None:
        if when == "before":
            os.kill(os.getpid(), signal.SIGUSR1)
        hand_off(item)
        if when == "after":
            os.kill(os.getpid(), signal.SIGUSR1)

    monkeypatch.setattr(pub, "_hand_off", interrupted)
    try:
        if when == "before":
            with pytest.raises(PublisherClosedError):
                pub.publish_event("bank_churn", "bank_churn", bank_event(1))
        else:
            assert pub.publish_event("bank_churn", "bank_churn", bank_event(1))
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(closed) == 1
    stats = pub.stats()
    published = 2 if when == "after" else 1
    assert (stats.accepted, stats.delivered, fiddler.count()) == (published,) * 3
    assert not pub._handoff


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forking with threads is the point
@pytest.mark.parametrize("first", ["stats", "publish"])
def test_a_child_forked_while_the_parent_closes_does_not_wait_for_it(
    fiddler: Emulator, first: str
) -> None:
    """The parent's loop thread is not in the child: neither stats() nor close() there may
    wait for it, whatever the child called first."""
    pub = sync_publisher(fiddler, "asyncio")
    pub.publish_event("bank_churn", "bank_churn", bank_event(0))
    fiddler.set_faults(script=["hang"])  # the parent's close waits on its last request
    closing = threading.Thread(target=pub.close, args=(2.0,))
    closing.start()
    while pub._closing is None:
        time.sleep(0.001)
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            signal.alarm(20)  # a wait that never ends kills the child: the test fails
            if first == "publish":
                with contextlib.suppress(PublisherClosedError):
                    pub.publish_event("bank_churn", "bank_churn", bank_event(1))
            pub.stats()
            code = 0 if pub.close(1).complete else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    closing.join(30)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # forking with threads is the point
def test_threads_of_a_forked_child_share_one_fresh_loop(fiddler: Emulator, backend: str) -> None:
    """gunicorn --preload with threaded workers: in the child, several threads make their
    first calls at once. None may take the parent's loop (not in the child: it would wait
    for good); all share the one the first starts."""
    pub = sync_publisher(fiddler, backend)
    pub.publish_event("bank_churn", "bank_churn", bank_event(0))
    pub.flush(10)
    pid = os.fork()
    if pid == 0:  # the child: never return into the test runner
        code = 1
        try:
            faulthandler.dump_traceback_later(60, exit=True)  # a hang fails, not blocks
            start = threading.Barrier(8)

            def work(n: int) -> None:
                start.wait()
                for i in range(200):
                    pub.publish_event("bank_churn", "bank_churn", bank_event(1000 * n + i))

            threads = [threading.Thread(target=work, args=(n,)) for n in range(8)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            loops = [t for t in threading.enumerate() if t.name == "fiddler_async"]
            pub.close(10)
            stats = pub.stats()
            code = 0 if (stats.accepted, stats.delivered, len(loops)) == (1600, 1600, 1) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    pub.close(10)
    assert fiddler.count() == 1601


def test_a_handoff_whose_wakeup_was_interrupted_is_still_sent(
    fiddler: Emulator, backend: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A signal handler that raises (Celery's soft time limit) inside publish_event, as it
    schedules the loop's wake-up: the caller gets the exception, and the later events still
    go in the background, with no flush or stats to move them."""

    class SoftTimeLimit(Exception):
        pass

    with sync_publisher(fiddler, backend, linger=0.01) as pub:
        pub.publish_event("bank_churn", "bank_churn", bank_event(0))  # the route known
        pub.flush(10)
        assert pub._loop is not None
        schedule = pub._loop.call_soon

        def interrupted(fn: Any) -> None:
            monkeypatch.setattr(pub._loop, "call_soon", schedule)
            raise SoftTimeLimit

        monkeypatch.setattr(pub._loop, "call_soon", interrupted)
        with pytest.raises(SoftTimeLimit):
            pub.publish_event("bank_churn", "bank_churn", bank_event(1))
        for i in range(2, 12):
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        deadline = time.monotonic() + 10
        while fiddler.count() < 12 and time.monotonic() < deadline:
            time.sleep(0.01)  # the background's doing only: nothing here drains the hand-off
        assert fiddler.count() == 12


def test_a_close_interrupting_a_close_on_its_thread_ends_with_it(fiddler: Emulator) -> None:
    """A signal handler's close() that lands while its thread is already in close(): it
    ends the close through the loop, and says what it delivered, rather than wait for the
    interrupted call (which cannot go on until the handler returns) up to its timeout."""
    pub = sync_publisher(fiddler, "asyncio", linger=3600)
    for i in range(10):
        pub.publish_event("bank_churn", "bank_churn", bank_event(i))
    fiddler.set_faults(latency=0.3)  # the close's request takes a while: the signal comes first
    handled: list[Any] = []
    previous = signal.signal(signal.SIGUSR1, lambda *_: handled.append(pub.close(30)))
    try:
        timer = threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGUSR1))
        timer.start()
        first = pub.close(30)
        timer.join()
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert len(handled) == 1
    assert handled[0].delivered == first.delivered == 10
    assert fiddler.count() == 10


def test_flush_and_stats_after_close_say_what_is_left(fiddler: Emulator, backend: str) -> None:
    """As AsyncPublisher's: a flush after close is no error (an atexit hook of the user's
    runs after ours), it says what is pending."""
    pub = sync_publisher(fiddler, backend)
    pub.publish_event("bank_churn", "bank_churn", bank_event(0))
    pub.close(10)
    assert pub.flush(1) == FlushResult()
    assert pub.stats().delivered == 1


def test_an_on_error_returning_a_coroutine_has_it_awaited(fiddler: Emulator, backend: str) -> None:
    """``on_error=lambda f: alert(f)`` with ``alert`` async: the coroutine it returns is
    awaited (on the loop), as AsyncPublisher does."""
    alerted: list[str] = []

    async def alert(failure: DeliveryFailure) -> None:
        alerted.append(type(failure.error).__name__)

    with sync_publisher(fiddler, backend, on_error=lambda failure: alert(failure)) as pub:  # noqa: PLW0108  (the point)
        pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "forty"})
        pub.flush(10)
    assert alerted == ["BadRequestError"]


@pytest.mark.parametrize("kind", ["asyncio", "trio"])
def test_an_on_error_raising_a_cancellation_stops_nothing(
    fiddler: Emulator, backend: str, kind: str
) -> None:
    """A callback that raises its own event loop's cancellation (an ``asyncio.run`` inside it,
    cancelled): nothing cancelled the publisher, whose delivery goes on."""
    import asyncio

    import trio

    # (trio makes its Cancelled only through this private constructor.)
    cancellation = asyncio.CancelledError if kind == "asyncio" else trio.Cancelled._create
    calls: list[str] = []

    def on_error(failure: DeliveryFailure) -> None:
        calls.append(failure.event_ids[0])
        raise cancellation()

    with sync_publisher(fiddler, backend, on_error=on_error) as pub:
        pub.publish_event("bank_churn", "bank_churn", {**bank_event(0), "age": "forty"})
        pub.flush(10)
        for i in range(1, 11):
            pub.publish_event("bank_churn", "bank_churn", bank_event(i))
        result = pub.flush(10)
    assert (result.delivered, len(calls), fiddler.count()) == (10, 1, 10)

"""The token stays secret: never over plain http to another machine, never in a repr, a log
line, an exception, a failure report or the stats."""

from __future__ import annotations

import logging
import socket

import pytest

from fiddler_async import AsyncPublisher, ConfigurationError, DeliveryFailure, PublisherConfig
from fiddler_async.emulator import Emulator

from .conftest import bank_event, config
from .in_process import TOKEN

SECRET = "s3cr3t-T0K3N-do-not-print"


@pytest.mark.parametrize(
    "url", ["http://localhost:8080", "http://127.0.0.5", "http://[::1]:9", "https://acme.ai"]
)
def test_loopback_and_https_are_allowed(url: str) -> None:
    AsyncPublisher(url, SECRET)


def test_plain_http_to_another_machine_needs_consent() -> None:
    with pytest.raises(ConfigurationError, match="clear text"):
        AsyncPublisher("http://fiddler.internal", SECRET)
    with pytest.raises(ConfigurationError, match="clear text"):
        AsyncPublisher("http://10.0.0.8:8080", SECRET)
    AsyncPublisher(
        "http://fiddler.internal", SECRET, config=PublisherConfig(allow_insecure_http=True)
    )


@pytest.mark.anyio
async def test_a_loopback_url_never_goes_through_a_proxy(
    fiddler: Emulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An HTTP proxy in the environment (common in companies) would get the token in clear
    text: a loopback URL, the one plain-http case allowed, goes to this machine directly."""
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{closed_port()}")  # would refuse all
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    async with AsyncPublisher(fiddler.url, TOKEN, config=config()) as pub:
        pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
        assert (await pub.flush(10)).delivered == 1


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.anyio
async def test_the_token_is_in_no_message(
    fiddler: Emulator, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    texts: list[str] = []

    def on_error(failure: DeliveryFailure) -> None:
        texts.extend([str(failure.error), repr(failure.error), repr(failure)])

    # Refused (the emulator does not know this token), and unreachable.
    for url in (fiddler.url, f"http://127.0.0.1:{closed_port()}"):
        pub = AsyncPublisher(url, SECRET, config=config(retry_max_attempts=2), on_error=on_error)
        texts.append(repr(pub))
        async with pub:
            pub.publish_event_nowait("bank_churn", "bank_churn", bank_event())
            await pub.flush(10)
            texts.append(repr(pub.stats()))
    assert len(texts) > 6
    everything = "\n".join([*texts, caplog.text])
    assert "401" in everything  # the refusal was reported...
    assert SECRET not in everything  # ...without the token

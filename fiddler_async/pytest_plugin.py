"""A pytest fixture for your own tests: ``fiddler_emulator``, a Fiddler emulator on a free
loopback port, fresh for each test.

Installed with the package (a ``pytest11`` entry point), so it needs no import::

    @pytest.mark.anyio  # with anyio's pytest plugin (installed with anyio)
    async def test_my_service_publishes(fiddler_emulator):
        async with AsyncPublisher(fiddler_emulator.url, fiddler_emulator.token) as pub:
            pub.publish_event_nowait("bank_churn", "bank_churn", {"age": 42})
        assert fiddler_emulator.count() == 1

The emulator itself is imported only when a test asks for the fixture, so installing this
package without the ``server`` extra does not break anyone's test run.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from .emulator import Emulator


@pytest.fixture
def fiddler_emulator() -> Iterator[Emulator]:
    """A running emulator (bank_churn model, in-memory storage); see fiddler_async.emulator."""
    try:
        from .emulator import running_emulator  # noqa: PLC0415
    except ImportError as exc:  # pragma: no cover
        pytest.fail(
            "fiddler_emulator needs the server extra: pip install 'fiddler-async[server]' "
            f"(from a clone: '.[server]'): {exc}"
        )
    with running_emulator() as emulator:
        yield emulator

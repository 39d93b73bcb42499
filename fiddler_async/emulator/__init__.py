"""A local Fiddler: the v3 publishing API on a real HTTP server, backed by SQLite.

For offline development and tests, yours and ours. Needs the ``server`` extra
(``pip install 'fiddler-async[server]'``). The library itself never imports this package.

    from fiddler_async.emulator import running_emulator

    with running_emulator() as fiddler:          # a free loopback port, in-memory storage
        ...  # AsyncPublisher(fiddler.url, fiddler.token) ...
        assert fiddler.count() == 100

In async code, ``async with emulator() as fiddler:``; in pytest, the ``fiddler_emulator`` fixture.
"""

from .app import EmulatorState, create_app
from .catalog import Catalog, ModelDef, load_catalog
from .faults import Faults
from .server import (
    DEFAULT_TOKEN,
    Emulator,
    ListenError,
    emulator,
    emulator_process,
    running_emulator,
    serve_forever,
)
from .store import Store

__all__ = [
    "DEFAULT_TOKEN",
    "Catalog",
    "Emulator",
    "EmulatorState",
    "Faults",
    "ListenError",
    "ModelDef",
    "Store",
    "create_app",
    "emulator",
    "emulator_process",
    "load_catalog",
    "running_emulator",
    "serve_forever",
]

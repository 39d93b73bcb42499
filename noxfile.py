"""Development sessions: ``nox -s lint typecheck minimal docs tests`` is what CI runs (.ci/run)."""

from __future__ import annotations

import nox

nox.options.default_venv_backend = "venv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["lint", "typecheck", "minimal", "docs", "tests"]

PYPROJECT = nox.project.load_toml("pyproject.toml")


def install_group(session: nox.Session, group: str) -> None:
    session.install(*nox.project.dependency_groups(PYPROJECT, group))


@nox.session
def tests(session: nox.Session) -> None:
    """The test suite, on asyncio and trio."""
    session.install("-e", ".[cli,parquet,dataframes]")
    install_group(session, "test")
    session.run("pytest", *session.posargs)


@nox.session
def minimal(session: nox.Session) -> None:
    """The core install alone, no extras and no trio: it must import and publish."""
    session.install(".")
    session.run("python", "tests/minimal_install.py")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: lint (with the ASYNC rules) and formatting."""
    install_group(session, "lint")
    paths = ["fiddler_async", "tests", "benchmarks", "examples", "noxfile.py"]
    session.run("ruff", "check", *paths)
    session.run("ruff", "format", "--check", *paths)


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict on the package, the examples, and tests/typing (a file that uses the
    public API)."""
    session.install("-e", ".[cli]")
    install_group(session, "typecheck")
    session.run("mypy")


@nox.session
def docs(session: nox.Session) -> None:
    """The documentation site (MkDocs), built strictly: a warning fails the build."""
    session.install("-e", ".[server,dataframes,otel]")
    install_group(session, "docs")
    session.run(
        "mkdocs", "build", "--strict", "--site-dir", "build/site", env={"NO_MKDOCS_2_WARNING": "1"}
    )


@nox.session
def bench(session: nox.Session) -> None:
    """fiddler_async side by side with its peers, every row in one run (writes
    benchmarks/RESULTS.md and RESULTS.jsonl; ~20 minutes with the defaults)."""
    session.install("-e", ".[server]")
    install_group(session, "peers")
    session.run(
        "python", "-m", "benchmarks.peers", "--out", "benchmarks/RESULTS.md", *session.posargs
    )


@nox.session(name="bench-publish")
def bench_publish(session: nox.Session) -> None:
    """The publish calls alone: latency and end-to-end throughput against a loopback sink,
    healthy, slow and down (prints a table; ~4 minutes)."""
    session.install("-e", ".[server]")
    install_group(session, "sink")
    session.run("python", "-m", "benchmarks.publish", *session.posargs)

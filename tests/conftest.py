from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest

from fhir_adapter.intake import Intake
from fhir_adapter.trial import Trial, load_trial
from tests.session_summary import HAPI_SUMMARY

TODAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="session")
def trial() -> Trial:
    return load_trial()


@pytest.fixture
def intake(trial: Trial) -> Intake:
    return Intake(trial=trial, today=TODAY)


# -- running in parallel (pytest-xdist, `make test`: -n 2) -------------------------------------
# Every test of a module runs in one worker (its module fixtures are made once), and every test
# that talks to HAPI FHIR - its nodeid names it: test_hapi_*.py, [hapi], [hapi-atomic] - runs in
# one worker (one JVM for the session, not one per worker). A scheduler of our own: xdist's
# loadgroup marks do not reach the controller under pytest 9.2 (it rewrites Node._nodeid, which
# pytest no longer reads).
@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndHapi(LoadScopeScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            return "hapi" if "hapi" in nodeid else nodeid.split("::", 1)[0]

    return ModulesAndHapi(config, log)


def pytest_sessionfinish(session: pytest.Session) -> None:
    """In a pytest-xdist worker: hand the HAPI summary to the controller, which prints it."""
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        workeroutput["hapi_summary"] = json.dumps(HAPI_SUMMARY)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: Any) -> None:
    """The controller of pytest-xdist gathers the workers' HAPI summaries."""
    HAPI_SUMMARY.extend(json.loads(getattr(node, "workeroutput", {}).get("hapi_summary", "[]")))


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    if HAPI_SUMMARY and not hasattr(config, "workeroutput"):
        terminalreporter.section("HAPI FHIR")
        for line in HAPI_SUMMARY:
            terminalreporter.write_line(line)

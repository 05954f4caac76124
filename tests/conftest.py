from __future__ import annotations

import datetime as dt

import pytest

from fhir_adapter.intake import Intake
from fhir_adapter.trial import Trial, load_trial

TODAY = dt.date(2026, 11, 1)


@pytest.fixture(scope="session")
def trial() -> Trial:
    return load_trial()


@pytest.fixture
def intake(trial: Trial) -> Intake:
    return Intake(trial=trial, today=TODAY)


# -- running in parallel (pytest-xdist, `make test`: -n 2 --dist loadgroup) --------------------
# Every test of a module runs in one worker (its module fixtures are made once), and every test
# that talks to HAPI FHIR runs in one worker (one JVM for the session, not one per worker).
def _uses_hapi(item: pytest.Item) -> bool:
    params = getattr(getattr(item, "callspec", None), "params", {})
    return (
        "hapi" in item.path.name
        or any("hapi" in name for name in getattr(item, "fixturenames", ()))
        or any("hapi" in str(value) for value in params.values())
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        group = "hapi" if _uses_hapi(item) else item.nodeid.split("::", 1)[0]
        item.add_marker(pytest.mark.xdist_group(group))

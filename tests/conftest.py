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

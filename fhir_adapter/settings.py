"""All configuration in one place (SPEC §1, §13).

Every setting has a default, so the read-only commands (`score`, `validate`, `eligibility`,
`map`) run with no configuration at all. Environment variables carry the prefix
``FHIR_ADAPTER_`` (e.g. ``FHIR_ADAPTER_FHIR_BASE_URL``); secrets are ``SecretStr`` and are never
logged or printed.
"""

from __future__ import annotations

import os
from decimal import Decimal
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict


def _default_state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "fhir-adapter"


class Settings(BaseSettings):
    """The adapter's settings. Sources, in priority order: explicit arguments, environment."""

    model_config = SettingsConfigDict(env_prefix="FHIR_ADAPTER_", extra="ignore", frozen=True)

    # --- FHIR server -------------------------------------------------------------------------
    fhir_base_url: str = Field(
        default="http://127.0.0.1:8103/fhir/R4", description="Base URL of the target FHIR server"
    )
    fhir_version: Literal["R4", "R5"] = Field(default="R4", description="FHIR version to emit")
    fhir_auth: Literal["none", "bearer", "smart"] = Field(
        default="none", description="none, a static bearer token, or SMART Backend Services"
    )
    fhir_token: SecretStr | None = Field(default=None, description="Static bearer token")
    smart_token_url: str | None = Field(default=None, description="SMART token endpoint")
    smart_client_id: str | None = None
    smart_private_key: SecretStr | None = Field(
        default=None, description="PEM private key signing the JWT client assertion"
    )
    smart_private_key_path: Path | None = Field(default=None, description="...or its file")
    smart_key_id: str | None = Field(default=None, description="kid header of the assertion")
    smart_algorithm: Literal["RS384", "ES384", "RS256", "ES256"] = "RS384"
    smart_scope: str = "system/*.rs system/*.cud"
    connect_timeout_s: float = Field(default=5.0, gt=0)
    read_timeout_s: float = Field(default=60.0, gt=0)
    ca_bundle: Path | None = Field(default=None, description="Custom CA bundle (PEM)")
    client_cert: Path | None = Field(default=None, description="Client certificate for mTLS")
    client_key: Path | None = Field(default=None, description="Client key for mTLS")
    proxy: str | None = Field(default=None, description="HTTP(S) proxy URL")
    max_attempts: int = Field(default=6, ge=1, description="Attempts per request (retryable)")
    max_retry_seconds: float = Field(default=120.0, gt=0, description="Total retry time")
    bundle_size: int = Field(default=100, ge=1, le=5000)
    identity_strategy: Literal["auto", "identifier", "tag", "client-id"] = Field(
        default="auto", description="How resources are matched on the server (auto: from /metadata)"
    )

    # --- identity ----------------------------------------------------------------------------
    identifier_base: str = Field(
        default="urn:nct06677931", description="Base of business identifier systems"
    )
    mrn_system: str = Field(
        default="urn:fhir-adapter:hospital-mrn",
        description="Identifier system of the hospital MRN (hospital target only)",
    )

    # --- data and trial definition -----------------------------------------------------------
    mappings_dir: Path | None = Field(
        default=None, description="Directory of trial YAML files (default: the packaged ones)"
    )
    adjudication_threshold: Decimal | None = Field(
        default=None, description="MASI difference needing a third rater (default: study.yaml)"
    )
    site_timezone: str | None = Field(
        default=None, description="Time zone of the site's dates (default: study.yaml)"
    )

    # --- outbox and webhook ------------------------------------------------------------------
    outbox_path: Path = Field(default_factory=lambda: _default_state_dir() / "outbox.sqlite")
    webhook_secret: SecretStr | None = None
    webhook_token: SecretStr | None = None
    max_request_bytes: int = 1024 * 1024

    # --- de-identification -------------------------------------------------------------------
    deid_key: SecretStr | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    # --- registry queries on Spark (fhir-adapter view/query --engine spark) --------------------
    spark_master: str = Field(default="local[2]", description="Spark master URL")
    spark_ivy_dir: Path | None = Field(
        default=None, description="Cache of Pathling's jars (default: ~/.cache/fhir-adapter/ivy)"
    )
    spark_staging_dir: Path | None = Field(
        default=None, description="Where sources are staged as Bulk NDJSON for Spark (shared)"
    )

    @model_validator(mode="after")
    def _mrn_outside_the_trial(self) -> Settings:
        # the hospital MRN is the hospital's identifier, never one of the trial's (SPEC §6)
        if self.mrn_system.startswith(self.identifier_base):
            raise ValueError("mrn_system must not lie under identifier_base")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # Explicit sources only: arguments, then the environment. No implicit .env files.
        return (init_settings, env_settings)

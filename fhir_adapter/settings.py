"""All configuration in one place (SPEC §1, §13).

Every setting has a default, so the read-only commands (`score`, `validate`, `eligibility`,
`map`) run with no configuration at all. Environment variables carry the prefix
``FHIR_ADAPTER_`` (e.g. ``FHIR_ADAPTER_FHIR_BASE_URL``); secrets are ``SecretStr`` and are never
logged or printed.
"""

from __future__ import annotations

import base64
import os
import re
from decimal import Decimal
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from fhir_adapter.errors import ConfigurationError


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
    atomic_transactions: bool = Field(
        default=False,
        description="The server applies a transaction Bundle all or nothing: entries may then "
        "refer to each other inside a Bundle (urn:uuid); otherwise they go in dependency layers",
    )
    lock_timeout_s: float = Field(
        default=300.0, ge=0, description="How long a second writer waits for the outbox lock"
    )
    max_removal_share: float = Field(
        default=0.2,
        ge=0,
        le=1,
        description="Share of a file's records one sync may remove without --allow-removals",
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
    strict_validation: bool = Field(
        default=False,
        description="Validate every emitted resource with its fhir.resources model (slower); "
        "by default each resource shape is validated once and then the values of every resource",
    )

    # --- outbox and webhook ------------------------------------------------------------------
    outbox_path: Path = Field(default_factory=lambda: _default_state_dir() / "outbox.sqlite")
    webhook_secret: SecretStr | None = None
    webhook_token: SecretStr | None = None
    max_request_bytes: int = 1024 * 1024

    # --- de-identification -------------------------------------------------------------------
    deid_key: SecretStr | None = None

    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"

    # --- intake limits (SPEC §3) -----------------------------------------------------------
    max_file_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="Largest source file read (bytes)"
    )
    max_columns: int = Field(default=512, ge=1, description="Widest header read (columns)")
    mrn_pattern: str = Field(
        default=r"[A-Za-z0-9-]{1,32}",
        description="Regular expression a whole hospital MRN must match; others are dropped",
    )

    @field_validator("mrn_pattern")
    @classmethod
    def _compiles(cls, value: str) -> str:
        try:
            re.compile(value)
        except re.error as exc:
            raise ValueError(f"not a regular expression ({exc.msg})") from None
        return value

    # --- registry queries on Spark (fhir-adapter view/query --engine spark) --------------------
    spark_master: str = Field(default="local[2]", description="Spark master URL")
    spark_ivy_dir: Path | None = Field(
        default=None, description="Cache of Pathling's jars (default: ~/.cache/fhir-adapter/ivy)"
    )
    spark_staging_dir: Path | None = Field(
        default=None, description="Where sources are staged as Bulk NDJSON for Spark (shared)"
    )

    # --- webhook server and delivery worker (SPEC §8; appended) ------------------------------
    webhook_standard_secret: SecretStr | None = Field(
        default=None, description="Standard Webhooks secret (whsec_<base64>)"
    )
    webhook_bind: str = Field(default="127.0.0.1:8080", description="HOST:PORT of `serve`")
    webhook_workers: int = Field(default=2, ge=1, le=64, description="WSGI worker processes")
    webhook_threads: int = Field(default=4, ge=1, le=256, description="Threads per worker")
    webhook_timeout_s: float = Field(default=30.0, gt=0, description="WSGI worker timeout")
    webhook_signature_tolerance_s: int = Field(
        default=300, ge=1, le=3600, description="Accepted clock skew of signed requests"
    )
    webhook_target: Literal["registry", "hospital"] = Field(
        default="registry", description="Mapping target of records pushed to the webhook"
    )
    delivery_interval_s: float = Field(
        default=0.5, gt=0, le=60, description="How often the delivery worker looks for work"
    )
    delivery_retry_s: float = Field(
        default=5.0, gt=0, le=3600, description="Pause after the FHIR server was unreachable"
    )

    @model_validator(mode="after")
    def _standard_secret_format(self) -> Settings:
        secret = self.webhook_standard_secret
        if secret is not None:
            value = secret.get_secret_value().removeprefix("whsec_")
            well_formed = secret.get_secret_value().startswith("whsec_") and bool(
                re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", value)
            )
            if not well_formed or len(base64.b64decode(value + "==")) < 16:
                raise ValueError(
                    "webhook_standard_secret must be whsec_ followed by base64 of >= 16 bytes"
                )
        return self

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


def check_base_url(url: str, what: str = "FHIR_ADAPTER_FHIR_BASE_URL") -> str:
    """An absolute http(s) URL with a host, or a ConfigurationError naming the setting."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigurationError(
            f"{what} {url!r} is not an http(s) URL (e.g. https://fhir.example.org/fhir/R4)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError:
        raise ConfigurationError(f"{what} {url!r} has an invalid port") from None
    return url

"""Authentication to the FHIR server (SPEC §7): static bearer token and SMART Backend Services
(client credentials with a signed JWT assertion, token cached, refreshed once on a 401).
Secrets never appear in logs, exceptions or reprs."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from pytest_httpserver import HTTPServer
from werkzeug import Request, Response

from fhir_adapter.client import FhirClient
from fhir_adapter.errors import AuthError, ConfigurationError
from fhir_adapter.settings import Settings

BASE = "/fhir/R4"
FHIR_JSON = "application/fhir+json"
CLIENT_ID = "fhir-adapter-test-client"
ASSERTION_TYPE = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"
BEARER = "SECRET-TOKEN-123"
PATIENT = {"resourceType": "Patient", "id": "p1"}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def private_pem(rsa_key: rsa.RSAPrivateKey) -> str:
    return rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()


def fhir(body: Any, status: int = 200) -> Response:
    return Response(json.dumps(body), status=status, content_type=FHIR_JSON)


def unauthorized() -> Response:
    return fhir(
        {
            "resourceType": "OperationOutcome",
            "issue": [{"severity": "error", "code": "login", "diagnostics": "token expired"}],
        },
        401,
    )


class TokenEndpoint:
    """A SMART token endpoint that verifies the client assertion as a real one would."""

    def __init__(
        self, server: HTTPServer, key: rsa.RSAPrivateKey, *, expires_in: int = 300
    ) -> None:
        self.url = server.url_for("/auth/token")
        self.public_key = key.public_key()
        self.expires_in = expires_in
        self.issued: list[str] = []
        self.assertions: list[str] = []
        self.headers: list[dict[str, Any]] = []
        self.errors: list[str] = []
        self._jtis: set[str] = set()
        self._lock = threading.Lock()
        server.expect_request("/auth/token", method="POST").respond_with_handler(self.handle)

    def handle(self, request: Request) -> Response:
        try:
            token = self._check(request)
        except (AssertionError, jwt.PyJWTError, KeyError) as exc:
            self.errors.append(repr(exc))
            return Response(json.dumps({"error": "invalid_client"}), 400)
        return Response(
            json.dumps(
                {"access_token": token, "token_type": "bearer", "expires_in": self.expires_in}
            ),
            content_type="application/json",
        )

    def _check(self, request: Request) -> str:
        assert request.mimetype == "application/x-www-form-urlencoded", request.mimetype
        form = request.form
        assert form["grant_type"] == "client_credentials"
        assert form["client_assertion_type"] == ASSERTION_TYPE
        assert form["scope"]
        assertion = form["client_assertion"]
        self.assertions.append(assertion)
        self.headers.append(jwt.get_unverified_header(assertion))
        claims = jwt.decode(
            assertion,
            self.public_key,
            algorithms=["RS384"],
            audience=self.url,
            issuer=CLIENT_ID,
            options={"require": ["iss", "sub", "aud", "exp", "jti"]},
        )
        assert claims["sub"] == CLIENT_ID
        assert claims["exp"] <= time.time() + 300  # at most five minutes (SMART)
        with self._lock:
            assert claims["jti"] not in self._jtis, "jti reused"
            self._jtis.add(claims["jti"])
            self.issued.append(f"tok{len(self.issued) + 1}")
            return self.issued[-1]


def smart_settings(server: HTTPServer, tokens: TokenEndpoint, pem: str, **over: Any) -> Settings:
    values: dict[str, Any] = {
        "fhir_base_url": server.url_for(BASE),
        "fhir_auth": "smart",
        "smart_token_url": tokens.url,
        "smart_client_id": CLIENT_ID,
        "smart_private_key": pem,
        "max_attempts": 2,
        "connect_timeout_s": 0.5,
        "read_timeout_s": 0.5,
    }
    values.update(over)
    return Settings(**values)


def bearer_settings(server: HTTPServer) -> Settings:
    return Settings(
        fhir_base_url=server.url_for(BASE),
        fhir_auth="bearer",
        fhir_token=BEARER,
        connect_timeout_s=0.5,
        read_timeout_s=0.5,
    )


def fhir_calls(server: HTTPServer) -> list[str]:
    """The Authorization header of every request to the FHIR endpoint, in order."""
    return [r.headers.get("Authorization", "") for r, _ in server.log if r.path.startswith(BASE)]


# -- SMART Backend Services ---------------------------------------------------------------------


def test_401_triggers_exactly_one_token_refresh(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    path = f"{BASE}/Patient/p1"
    httpserver.expect_oneshot_request(path).respond_with_response(unauthorized())
    httpserver.expect_oneshot_request(path).respond_with_response(fhir(PATIENT))
    with FhirClient(smart_settings(httpserver, tokens, private_pem)) as client:
        assert client.read("Patient", "p1") == PATIENT
    assert tokens.errors == []
    assert tokens.issued == ["tok1", "tok2"]
    assert fhir_calls(httpserver) == ["Bearer tok1", "Bearer tok2"]
    httpserver.check_assertions()


def test_token_is_cached_across_requests(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(fhir(PATIENT))
    with FhirClient(smart_settings(httpserver, tokens, private_pem)) as client:
        for _ in range(4):
            client.read("Patient", "p1")
    assert tokens.errors == []
    assert tokens.issued == ["tok1"]
    assert fhir_calls(httpserver) == ["Bearer tok1"] * 4


def test_expired_token_is_fetched_again(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key, expires_in=0)
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(fhir(PATIENT))
    with FhirClient(smart_settings(httpserver, tokens, private_pem)) as client:
        client.read("Patient", "p1")
        client.read("Patient", "p1")
    assert tokens.issued == ["tok1", "tok2"]
    assert fhir_calls(httpserver) == ["Bearer tok1", "Bearer tok2"]
    assert len(set(tokens.assertions)) == 2  # a fresh assertion (new jti) each time


def test_permanent_401_is_auth_error_after_one_refresh(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(unauthorized())
    with (
        FhirClient(smart_settings(httpserver, tokens, private_pem)) as client,
        pytest.raises(AuthError) as info,
    ):
        client.read("Patient", "p1")
    assert tokens.issued == ["tok1", "tok2"]
    assert fhir_calls(httpserver) == ["Bearer tok1", "Bearer tok2"]
    assert info.value.status == 401
    assert "error login" in str(info.value)
    # the server's own words stay out of the message (they may quote personal data)
    assert "token expired" not in str(info.value)
    assert "token expired" in info.value.full_message


def test_assertion_carries_the_key_id(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(fhir(PATIENT))
    cfg = smart_settings(httpserver, tokens, private_pem, smart_key_id="key-2026")
    with FhirClient(cfg) as client:
        client.read("Patient", "p1")
    assert tokens.errors == []
    assert tokens.headers == [{"alg": "RS384", "kid": "key-2026", "typ": "JWT"}]


def test_private_key_from_a_file(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str, tmp_path: Any
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    key_file = tmp_path / "key.pem"
    key_file.write_text(private_pem)
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(fhir(PATIENT))
    cfg = smart_settings(
        httpserver, tokens, private_pem, smart_private_key=None, smart_private_key_path=key_file
    )
    with FhirClient(cfg) as client:
        client.read("Patient", "p1")
    assert tokens.issued == ["tok1"]


def test_token_endpoint_refusal_is_auth_error(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    wrong_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    wrong_pem = wrong_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    with (
        FhirClient(smart_settings(httpserver, tokens, wrong_pem)) as client,
        pytest.raises(AuthError, match=r"refused the client assertion \(HTTP 400\)"),
    ):
        client.read("Patient", "p1")
    assert len(tokens.errors) == 1
    assert "InvalidSignatureError" in tokens.errors[0]
    assert fhir_calls(httpserver) == []  # no request without a token


def test_missing_auth_settings_are_configuration_errors(httpserver: HTTPServer) -> None:
    base = httpserver.url_for(BASE)
    with pytest.raises(
        ConfigurationError, match="SMART_TOKEN_URL and FHIR_ADAPTER_SMART_CLIENT_ID"
    ):
        FhirClient(Settings(fhir_base_url=base, fhir_auth="smart"))
    with pytest.raises(ConfigurationError, match="needs FHIR_ADAPTER_SMART_PRIVATE_KEY"):
        FhirClient(
            Settings(
                fhir_base_url=base,
                fhir_auth="smart",
                smart_token_url="http://127.0.0.1:1/token",  # noqa: S106
                smart_client_id=CLIENT_ID,
            )
        )
    with pytest.raises(ConfigurationError, match="FHIR_TOKEN") as info:
        FhirClient(Settings(fhir_base_url=base, fhir_auth="bearer"))
    assert info.value.exit_code == 66
    with pytest.raises(ConfigurationError, match="FHIR_TOKEN"):
        FhirClient(Settings(fhir_base_url=base, fhir_auth="bearer", fhir_token="  "))  # noqa: S106


@pytest.mark.parametrize(
    "key",
    ["not a key", "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"],
    ids=["garbage", "broken-pem"],
)
def test_unusable_smart_key_is_a_configuration_error_at_start(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, key: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    with pytest.raises(ConfigurationError, match="not a PEM private key usable with RS384") as info:
        FhirClient(smart_settings(httpserver, tokens, key))
    assert key not in str(info.value)
    assert tokens.assertions == []  # nothing was sent anywhere


def test_ec_algorithm_with_an_rsa_key_is_a_configuration_error(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, private_pem: str
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    with pytest.raises(ConfigurationError, match="ES384"):
        FhirClient(smart_settings(httpserver, tokens, private_pem, smart_algorithm="ES384"))


def test_unreadable_key_file_is_a_configuration_error(
    httpserver: HTTPServer, rsa_key: rsa.RSAPrivateKey, tmp_path: Any
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    cfg = smart_settings(httpserver, tokens, "", smart_private_key=None,
                         smart_private_key_path=tmp_path / "missing.pem")  # fmt: skip
    with pytest.raises(ConfigurationError, match="SMART_PRIVATE_KEY_PATH cannot be read"):
        FhirClient(cfg)


@pytest.mark.parametrize(
    ("over", "named"),
    [
        ({"fhir_base_url": "http://fhir.hospital.example/fhir/R4"}, "FHIR_BASE_URL"),
        ({"smart_token_url": "http://auth.hospital.example/token"}, "SMART_TOKEN_URL"),
    ],
    ids=["fhir-server", "token-endpoint"],
)
def test_credentials_never_travel_over_plain_http_beyond_loopback(
    httpserver: HTTPServer,
    rsa_key: rsa.RSAPrivateKey,
    private_pem: str,
    over: dict[str, str],
    named: str,
) -> None:
    tokens = TokenEndpoint(httpserver, rsa_key)
    with pytest.raises(ConfigurationError, match=f"{named} is plain http") as info:
        FhirClient(smart_settings(httpserver, tokens, private_pem, **over))
    assert "use https" in str(info.value)
    bearer = Settings(fhir_base_url="http://10.1.2.3/fhir", fhir_auth="bearer", fhir_token=BEARER)
    with pytest.raises(ConfigurationError, match=r"plain http to 10\.1\.2\.3"):
        FhirClient(bearer)
    # https anywhere, and http to this machine, are fine
    FhirClient(
        Settings(fhir_base_url="https://10.1.2.3/fhir", fhir_auth="bearer", fhir_token=BEARER)
    ).close()
    FhirClient(
        Settings(fhir_base_url="http://localhost:1/fhir", fhir_auth="bearer", fhir_token=BEARER)
    ).close()
    FhirClient(
        Settings(fhir_base_url="http://[::1]:1/fhir", fhir_auth="bearer", fhir_token=BEARER)
    ).close()


# -- static bearer ------------------------------------------------------------------------------


def test_static_bearer_header_is_sent(httpserver: HTTPServer) -> None:
    httpserver.expect_request(
        f"{BASE}/Patient/p1", headers={"Authorization": f"Bearer {BEARER}"}
    ).respond_with_response(fhir(PATIENT))
    with FhirClient(bearer_settings(httpserver)) as client:
        assert client.read("Patient", "p1") == PATIENT
    assert fhir_calls(httpserver) == [f"Bearer {BEARER}"]


def test_static_bearer_401_is_not_refreshed(httpserver: HTTPServer) -> None:
    httpserver.expect_request(f"{BASE}/Patient/p1").respond_with_response(unauthorized())
    with FhirClient(bearer_settings(httpserver)) as client, pytest.raises(AuthError):
        client.read("Patient", "p1")
    assert len(fhir_calls(httpserver)) == 1


# -- secrets ------------------------------------------------------------------------------------


def _leaks(text: str, secrets: list[str]) -> list[str]:
    return [s for s in secrets if s and s in text]


def test_secrets_never_in_logs_or_exceptions(
    httpserver: HTTPServer,
    rsa_key: rsa.RSAPrivateKey,
    private_pem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    errors: list[Exception] = []
    pem_lines = [line for line in private_pem.splitlines() if line and "-----" not in line]

    # static bearer: a success, then a 401
    httpserver.expect_oneshot_request(f"{BASE}/Patient/p1").respond_with_response(fhir(PATIENT))
    httpserver.expect_oneshot_request(f"{BASE}/Patient/p1").respond_with_response(unauthorized())
    with FhirClient(bearer_settings(httpserver)) as client:
        client.read("Patient", "p1")
        with pytest.raises(AuthError) as info:
            client.read("Patient", "p1")
        errors.append(info.value)
        assert BEARER not in repr(client.auth)
    httpserver.clear()

    # SMART: a success after one refresh, a permanent 401, a refused assertion, no endpoint
    tokens = TokenEndpoint(httpserver, rsa_key)
    path = f"{BASE}/Patient/p1"
    httpserver.expect_oneshot_request(path).respond_with_response(unauthorized())
    httpserver.expect_oneshot_request(path).respond_with_response(fhir(PATIENT))
    httpserver.expect_oneshot_request(path).respond_with_response(unauthorized())
    httpserver.expect_oneshot_request(path).respond_with_response(unauthorized())
    cfg = smart_settings(httpserver, tokens, private_pem)
    with FhirClient(cfg) as client:
        client.read("Patient", "p1")
        with pytest.raises(AuthError) as info:
            client.read("Patient", "p1")
        errors.append(info.value)
        auth_repr = repr(client.auth)
    assert tokens.errors == []
    assert len(tokens.assertions) == 3

    tokens.public_key = rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key()
    with FhirClient(cfg) as client, pytest.raises(AuthError) as info:
        client.read("Patient", "p1")
    errors.append(info.value)

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    gone = cfg.model_copy(update={"smart_token_url": f"http://127.0.0.1:{closed_port}/token"})
    with FhirClient(gone) as client, pytest.raises(AuthError) as info:
        client.read("Patient", "p1")
    errors.append(info.value)
    httpserver.check_assertions()

    secrets = [BEARER, *pem_lines, *tokens.assertions]
    assert caplog.text  # the client and urllib3 did log at DEBUG
    assert _leaks(caplog.text, secrets) == []
    for record in caplog.records:
        assert _leaks(record.getMessage(), secrets) == []
    for err in errors:
        assert _leaks(str(err), secrets) == []
        assert _leaks(repr(err), secrets) == []
        assert _leaks(repr(err.args), secrets) == []
    assert _leaks(auth_repr, secrets) == []


def test_settings_repr_hides_secrets(private_pem: str) -> None:
    cfg = Settings(
        fhir_auth="smart",
        fhir_token=BEARER,
        smart_private_key=private_pem,
        smart_token_url="https://auth.example/token",  # noqa: S106
        smart_client_id=CLIENT_ID,
        webhook_secret="hook-secret-xyz",  # noqa: S106
        deid_key="deid-key-xyz",
    )
    pem_lines = [line for line in private_pem.splitlines() if line and "-----" not in line]
    secrets = [BEARER, *pem_lines, "hook-secret-xyz", "deid-key-xyz"]
    for text in (repr(cfg), str(cfg), cfg.model_dump_json()):
        assert _leaks(text, secrets) == []
    assert "**********" in repr(cfg)
    assert cfg.fhir_token is not None
    assert cfg.fhir_token.get_secret_value() == BEARER

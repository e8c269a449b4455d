"""A local managed-identity endpoint, the way the Azure Functions / App Service host provides it.

The host sets `IDENTITY_ENDPOINT` (a plain-http loopback URL) and `IDENTITY_HEADER` (a secret the
caller must echo). A client asks

    GET {IDENTITY_ENDPOINT}?api-version=2019-08-01&resource=<scope without /.default>
    X-IDENTITY-HEADER: <IDENTITY_HEADER>

and gets `{"access_token", "expires_on" (epoch seconds, as a string), "resource", "token_type"}`.
The real `DefaultAzureCredential` (through MSAL's managed-identity client) talks to this server, so
code under test gets a real token the real way; the fake Azure services check the Bearer header
against `managed_identity.bearer(resource)`.

Use it as a pytest plugin: `pytest_plugins = ["tests.support.identity"]` in a conftest gives the
`managed_identity` fixture. Outside pytest, `ManagedIdentityEndpoint` is a context manager.

Tokens are random per endpoint and per resource (the audience): a token issued for Graph is not
accepted by the fake Log Analytics service, as in Azure. Tokens and the identity header are
secrets: tests may assert that they never appear in logs, errors or output.
"""

from __future__ import annotations

import secrets
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from tests.support.http_server import FakeService, Recorded, Reply

API_VERSION = "2019-08-01"
TOKEN_LIFETIME_SECONDS = 3600

# Everything DefaultAzureCredential looks at before (or instead of) the managed identity: cleared
# so that a developer's own environment cannot change which credential answers in tests.
CREDENTIAL_ENVIRONMENT = (
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_CERTIFICATE_PATH",
    "AZURE_CLIENT_CERTIFICATE_PASSWORD",
    "AZURE_CLIENT_SEND_CERTIFICATE_CHAIN",
    "AZURE_USERNAME",
    "AZURE_PASSWORD",
    "AZURE_FEDERATED_TOKEN_FILE",
    "AZURE_AUTHORITY_HOST",
    "AZURE_POD_IDENTITY_AUTHORITY_HOST",
    "AZURE_TOKEN_CREDENTIALS",
    "IDENTITY_SERVER_THUMBPRINT",
    "IMDS_ENDPOINT",
    "MSI_ENDPOINT",
    "MSI_SECRET",
    "IDENTITY_ENDPOINT",
    "IDENTITY_HEADER",
)


@dataclass
class Issued:
    """One token the endpoint handed out."""

    resource: str
    client_id: str | None
    token: str


@dataclass
class ManagedIdentityEndpoint(FakeService):
    """Start with `with ManagedIdentityEndpoint() as mi:`; then set `mi.environment()`."""

    header_secret: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    issued: list[Issued] = field(default_factory=list)
    refuse: int | None = None
    """When set, every token request is answered with this HTTP status (an identity not enabled)."""

    def __post_init__(self) -> None:
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()
        super().__init__()

    # --- what tests and fake services use -----------------------------------------------------

    @property
    def endpoint(self) -> str:
        return self.server.url + "/msi/token"

    def environment(self) -> dict[str, str]:
        """The two variables the Functions host sets for a system-assigned identity."""
        return {"IDENTITY_ENDPOINT": self.endpoint, "IDENTITY_HEADER": self.header_secret}

    def token_for(self, resource: str) -> str:
        """The access token this endpoint issues (or will issue) for a resource (an audience)."""
        key = _normalise(resource)
        with self._lock:
            if key not in self._tokens:
                self._tokens[key] = "mi-" + secrets.token_urlsafe(32)
            return self._tokens[key]

    def bearer(self, resource: str) -> str:
        """The exact Authorization header value a client must send to a service at `resource`."""
        return f"Bearer {self.token_for(resource)}"

    def authorized(self, recorded: Recorded, resource: str) -> bool:
        """Whether a request to a fake service carries the token issued for that service."""
        header = next((v for k, v in recorded.headers.items() if k.lower() == "authorization"), "")
        return secrets.compare_digest(header, self.bearer(resource))

    @property
    def secret_values(self) -> list[str]:
        """Every secret value this endpoint knows: assert none of them leaks into output."""
        with self._lock:
            return [self.header_secret, *self._tokens.values()]

    def resources(self) -> list[str]:
        """The audiences tokens were asked for, in order."""
        return [item.resource for item in self.issued]

    # --- the protocol -------------------------------------------------------------------------

    def _answer(self, recorded: Recorded) -> Reply:
        if recorded.method != "GET" or recorded.path != "/msi/token":
            return Reply(404, {"statusCode": 404, "message": "not found"})
        header = next((v for k, v in recorded.headers.items() if k.lower() == "x-identity-header"), None)
        if header is None or not secrets.compare_digest(header, self.header_secret):
            return Reply(401, {"statusCode": 401, "message": "X-IDENTITY-HEADER is missing or wrong"})
        if recorded.query.get("api-version") != [API_VERSION]:
            return Reply(400, {"statusCode": 400, "message": f"api-version must be {API_VERSION}"})
        resource = (recorded.query.get("resource") or [""])[0]
        if not resource or resource.endswith("/.default"):
            return Reply(400, {"statusCode": 400, "message": "resource must be a resource URI, not a scope"})
        if self.refuse is not None:
            return Reply(self.refuse, {"statusCode": self.refuse, "message": "identity not available"})
        client_id = (recorded.query.get("client_id") or [None])[0]
        token = self.token_for(resource)
        self.issued.append(Issued(resource=resource, client_id=client_id, token=token))
        return Reply(
            200,
            {
                "access_token": token,
                "expires_on": str(int(time.time()) + TOKEN_LIFETIME_SECONDS),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": client_id or "00000000-0000-0000-0000-000000000000",
            },
        )



def _normalise(resource: str) -> str:
    """Audiences compare without a trailing slash or a `/.default` suffix."""
    resource = resource.strip()
    if resource.endswith("/.default"):
        resource = resource[: -len("/.default")]
    return resource.rstrip("/")


@pytest.fixture
def managed_identity(monkeypatch: pytest.MonkeyPatch) -> Iterator[ManagedIdentityEndpoint]:
    """A running managed-identity endpoint, set in the environment as the Functions host does.

    Clears every other credential variable first (AZURE_CLIENT_ID would ask for a user-assigned
    identity; AZURE_CLIENT_SECRET would make EnvironmentCredential answer instead)."""
    for name in CREDENTIAL_ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    with ManagedIdentityEndpoint() as endpoint:
        for name, value in endpoint.environment().items():
            monkeypatch.setenv(name, value)
        yield endpoint

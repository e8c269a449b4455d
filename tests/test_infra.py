"""Checks of the deployment code in infra/ (issue 6).

Two readers look at the Bicep:

- checkov, the way CI runs it (``checkov -d infra --skip-download -o json --framework bicep``):
  zero parsing errors; the HTTPS-only, TLS 1.2, managed identity, FTP-disabled and blob
  public-access checks pass for every resource they apply to; every failing check is listed with
  a reason in docs/deploy.md ("Accepted checkov findings"), and nothing listed there passes.
- pycep, the parser checkov uses: the role assignments (built-in role GUIDs and scopes), the Key
  Vault references of the secret settings, the identity-based storage settings, and that every
  setting the app reads (interfaces.md) is set by the template or documented as optional.

The structural checks are functions that return a list of problems. Each one is run on the real
files (expect none) and on a deliberately broken copy (expect the problem), so none of them can
pass by not looking.

Tools: checkov comes from $CHECKOV_BIN, else .venv-tools/bin/checkov, else `checkov` on PATH
(its pins conflict with the app's venv). pycep is imported in-process when installed, else run
by the python beside the checkov binary. With no tool at all these tests skip, loudly; a
CHECKOV_BIN that points nowhere fails them.
"""

from __future__ import annotations

import fnmatch
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
MAIN_BICEP = INFRA / "main.bicep"
MONITORING_BICEP = INFRA / "modules" / "monitoring.bicep"
READER_BICEP = INFRA / "modules" / "workspace-reader.bicep"
PARAMETERS_JSON = INFRA / "main.parameters.json"
GRANT_SCRIPT = INFRA / "grant-graph-permissions.sh"
DEPLOY_DOC = REPO / "docs" / "deploy.md"
AZURE_YAML = REPO / "azure.yaml"
FUNCIGNORE = REPO / ".funcignore"
SHARED_INTERFACES = REPO.parent / "shared" / "docs" / "interfaces.md"

# Every setting in the interfaces.md settings table (kept here so the test does not depend on
# shared/; test_interface_settings_list_matches_shared_doc catches drift when shared/ is there).
INTERFACE_SETTINGS = [
    "ALERT_SCHEDULE",
    "DETECTIONS_PATH",
    "DETECTIONS",
    "QUERY_SOURCE",
    "LOG_ANALYTICS_WORKSPACE_ID",
    "LOG_ANALYTICS_ENDPOINT",
    "GRAPH_ENDPOINT",
    "LOCAL_DATA_PATH",
    "STATE_STORE",
    "STATE_PATH",
    "STATE_CONNECTION",
    "STATE_TABLE_ENDPOINT",
    "STATE_TABLE_NAME",
    "TEAMS_WEBHOOK_URL",
    "WEBHOOK_URL",
    "WEBHOOK_SECRET",
    "EMAIL_TO",
    "EMAIL_FROM",
    "SMTP_HOST",
    "SMTP_PORT",
    "SMTP_USERNAME",
    "SMTP_PASSWORD",
    "SMTP_SECURITY",
    "GRAPH_MAIL_SENDER",
    "REALERT_AFTER",
    "SUPPRESSIONS_PATH",
]

# Settings the app reads beyond interfaces.md (tuning knobs in alerter/settings.py).
EXTRA_APP_SETTINGS = [
    "HTTP_TIMEOUT",
    "HTTP_RETRIES",
    "RETRY_BACKOFF_MAX",
    "DELIVERY_GIVE_UP_AFTER",
    "RUN_BUDGET",
    "DIGEST_AT",
]

# Secret setting -> Key Vault secret name -> secure parameter of main.bicep.
SECRET_SETTINGS = {
    "TEAMS_WEBHOOK_URL": ("teams-webhook-url", "teamsWebhookUrl"),
    "WEBHOOK_URL": ("webhook-url", "webhookUrl"),
    "WEBHOOK_SECRET": ("webhook-secret", "webhookSecret"),
    "SMTP_PASSWORD": ("smtp-password", "smtpPassword"),
}

# Built-in role definition GUIDs (identical in every tenant).
ROLE_LOG_ANALYTICS_READER = "73c42c96-874c-492b-b04d-ab87d138a893"
ROLE_STORAGE_BLOB_DATA_OWNER = "b7e6dc6d-f1e8-4753-8033-0f276bb0955b"
ROLE_STORAGE_TABLE_DATA_CONTRIBUTOR = "0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3"
ROLE_KEY_VAULT_SECRETS_USER = "4633458b-17de-408a-b874-0445c86b69e6"
ROLE_KEY_VAULT_SECRETS_OFFICER = "b86a8fe4-44ce-4948-aee5-eccb2c155cd7"

APP_PRINCIPAL = "functionApp.identity.principalId"
WORKSPACE_ID = (
    "/subscriptions/11111111-2222-3333-4444-555555555555/resourceGroups/rg-soc"
    "/providers/Microsoft.OperationalInsights/workspaces/law-sentinel"
)
# The parameters main.bicep requires (no default), as a deployment would pass them.
REQUIRED_PARAMS = {"environmentName": "dev", "sentinelWorkspaceResourceId": WORKSPACE_ID}

# checkov checks that must pass for every resource they apply to, and a resource each must
# apply to (so a check cannot "pass" by not matching anything).
SITE = "Microsoft.Web/sites.functionApp"
STORAGE = "Microsoft.Storage/storageAccounts.storage"
CONTAINER = "Microsoft.Storage/storageAccounts/blobServices/containers.deploymentContainer"
REQUIRED_CHECKS = {
    "CKV_AZURE_14": SITE,  # web app redirects HTTP to HTTPS (httpsOnly)
    "CKV_AZURE_70": SITE,  # function app only accessible over HTTPS
    "CKV_AZURE_15": SITE,  # web app latest TLS
    "CKV_AZURE_145": SITE,  # function app latest TLS
    "CKV_AZURE_16": SITE,  # registered with Entra ID (managed identity)
    "CKV_AZURE_71": SITE,  # managed identity provider enabled
    "CKV_AZURE_78": SITE,  # FTP deployments disabled
    "CKV_AZURE_3": STORAGE,  # supportsHttpsTrafficOnly
    "CKV_AZURE_44": STORAGE,  # storage TLS 1.2
    "CKV_AZURE_34": CONTAINER,  # blob container public access level private
}


# ---------------------------------------------------------------------------------------------
# Tools
# ---------------------------------------------------------------------------------------------


def _missing_tool(reason: str) -> None:
    # Loud, but a skip: `make test` installs checkov and sets CHECKOV_BIN, and a CHECKOV_BIN that
    # points nowhere fails (see _find_checkov).
    pytest.skip(f"!!! INFRA CHECKS NOT RUN: {reason} (see docs/deploy.md, 'Checks')")


@lru_cache(maxsize=None)
def _find_checkov() -> str | None:
    configured = os.environ.get("CHECKOV_BIN")
    if configured:
        found = shutil.which(configured) or (configured if Path(configured).is_file() else None)
        if not found:
            pytest.fail(f"CHECKOV_BIN={configured!r} does not exist")
        return str(Path(found).absolute())  # checkov runs with cwd= the scanned folder
    local = REPO / ".venv-tools" / "bin" / "checkov"
    if local.is_file():
        return str(local)
    return shutil.which("checkov")


def checkov_bin() -> str:
    found = _find_checkov()
    if not found:
        _missing_tool("checkov not found (set CHECKOV_BIN, or install it into .venv-tools)")
    return found  # type: ignore[return-value]


_PYCEP_SNIPPET = (
    "import json, sys\n"
    "from pycep import BicepParser\n"
    "print(json.dumps(BicepParser().parse(text=sys.stdin.read()), default=str))\n"
)


@lru_cache(maxsize=1)
def _in_process_parser() -> Any:
    try:
        from pycep import BicepParser
    except ImportError:
        return None
    return BicepParser()


def parse_bicep(text: str) -> dict[str, Any]:
    parser = _in_process_parser()
    if parser is not None:
        return parser.parse(text=text)
    checkov = _find_checkov()
    python = Path(checkov).resolve().parent / "python" if checkov else None
    if python is None or not python.exists():
        _missing_tool("pycep is not importable and no checkov venv python was found")
    proc = subprocess.run(
        [str(python), "-c", _PYCEP_SNIPPET], input=text, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, f"pycep failed:\n{proc.stderr}"
    return json.loads(proc.stdout)


# ---------------------------------------------------------------------------------------------
# A small reader over pycep's JSON: pycep keeps identifiers and string literals alike as plain
# strings, so a string is a reference when it names a parameter, variable, resource or module.
# ---------------------------------------------------------------------------------------------


class Unsupported(Exception):
    """An expression this reader does not evaluate."""


@dataclass(frozen=True)
class Ref:
    """An unevaluated reference such as storage.name or functionApp.identity.principalId."""

    path: str


def dotted(node: Any) -> str | None:
    if isinstance(node, str):
        return node
    if isinstance(node, dict) and "operator" in node:
        op = node["operator"]
        if op.get("type") == "property_accessor":
            left = dotted(op["operands"]["operand_1"])
            right = dotted(op["operands"]["operand_2"])
            if left is not None and right is not None:
                return f"{left}.{right}"
    return None


def function_call(node: Any, name: str) -> dict[str, Any] | None:
    if isinstance(node, dict) and isinstance(node.get("function"), dict):
        if node["function"].get("type") == name:
            return node["function"].get("parameters") or {}
    return None


def unquote(key: str) -> str:
    return key[1:-1] if len(key) >= 2 and key[0] == key[-1] == "'" else key


class Template:
    def __init__(self, parsed: dict[str, Any]) -> None:
        self.params: dict[str, Any] = parsed.get("parameters") or {}
        self.variables: dict[str, Any] = parsed.get("variables") or {}
        self.resources: dict[str, Any] = parsed.get("resources") or {}
        self.modules: dict[str, Any] = parsed.get("modules") or {}
        self.outputs: dict[str, Any] = parsed.get("outputs") or {}

    @classmethod
    def from_text(cls, text: str) -> "Template":
        return cls(parse_bicep(text))

    # -- declarations --------------------------------------------------------------------------

    @staticmethod
    def _unwrap(config: dict[str, Any]) -> tuple[dict[str, Any], Any]:
        if isinstance(config, dict) and "condition" in config and "config" in config:
            return config["config"], config["condition"]
        return config, None

    def resource(self, name: str) -> tuple[dict[str, Any], Any]:
        """(body, condition or None) of a resource."""
        return self._unwrap(self.resources[name]["config"])

    def module(self, name: str) -> tuple[dict[str, Any], Any]:
        return self._unwrap(self.modules[name]["config"])

    def of_type(self, resource_type: str) -> list[str]:
        return [n for n, r in self.resources.items() if r.get("type") == resource_type]

    def is_secure(self, param: str) -> bool:
        decorators = self.params.get(param, {}).get("decorators") or []
        return any(d.get("type") == "secure" for d in decorators)

    def default(self, param: str) -> Any:
        return self.params[param].get("default")

    def variable(self, name: str) -> Any:
        return self.variables[name]["value"]

    # -- evaluation ----------------------------------------------------------------------------

    def value(self, node: Any, env: dict[str, Any]) -> Any:
        """Resolve parameters and variables; leave resource references as Ref."""
        if isinstance(node, str):
            if node in env:
                return env[node]
            if node in self.params:
                if self.default(node) is None:
                    raise Unsupported(f"parameter {node} has no default and no value")
                return self.default(node)
            if node in self.variables:
                return self.value(self.variable(node), env)
            return node
        if isinstance(node, (bool, int, float)) or node is None:
            return node
        if isinstance(node, list):
            return [self.value(item, env) for item in node]
        if isinstance(node, dict):
            if "operator" in node:
                path = dotted(node)
                if path is not None:
                    return Ref(path)
                return self._operator(node["operator"], env)
            if "function" in node:
                return self._function(node["function"], env)
            return {unquote(k): self.value(v, env) for k, v in node.items()}
        raise Unsupported(repr(node))

    def truth(self, node: Any, env: dict[str, Any]) -> bool:
        result = self.value(node, env)
        if not isinstance(result, bool):
            raise Unsupported(f"condition is not a boolean: {result!r}")
        return result

    def _operator(self, op: dict[str, Any], env: dict[str, Any]) -> Any:
        kind, ops = op.get("type"), op.get("operands") or {}
        if kind == "not":
            return not self.truth(ops["bool_value"], env)
        if kind == "or":
            return self.truth(ops["operand_1"], env) or self.truth(ops["operand_2"], env)
        if kind == "and":
            return self.truth(ops["operand_1"], env) and self.truth(ops["operand_2"], env)
        if kind == "equals":
            return self.value(ops["operand_1"], env) == self.value(ops["operand_2"], env)
        if kind == "not_equals":
            return self.value(ops["operand_1"], env) != self.value(ops["operand_2"], env)
        if kind == "conditional":
            branch = "true_value" if self.truth(ops["condition"], env) else "false_value"
            return self.value(ops[branch], env)
        if kind == "index_accessor":
            container = self.value(ops["operand_1"], env)
            index = self.value(ops["operand_2"], env)
            if isinstance(container, (Ref, str)) and not isinstance(container, list):
                raise Unsupported(f"index into {container!r}")
            return container[int(index)]
        raise Unsupported(f"operator {kind}")

    def _function(self, fn: dict[str, Any], env: dict[str, Any]) -> Any:
        kind, p = fn.get("type"), fn.get("parameters") or {}
        if kind == "empty":
            item = self.value(p["item_to_test"], env)
            if isinstance(item, Ref):
                raise Unsupported("empty() of a resource reference")
            return item in ("", None) or item == [] or item == {}
        if kind == "contains":
            container = self.value(p["container"], env)
            item = self.value(p["item_to_find"], env)
            return item in container
        if kind == "split":
            return str(self.value(p["input_string"], env)).split(str(self.value(p["delimiter"], env)))
        if kind == "replace":
            original = str(self.value(p["original_string"], env))
            return original.replace(str(self.value(p["old_string"], env)), str(self.value(p["new_string"], env)))
        raise Unsupported(f"function {kind}")


def app_settings_node(t: Template) -> dict[str, Any]:
    names = [
        n
        for n in t.of_type("Microsoft.Web/sites/config")
        if t.resource(n)[0].get("name") == "appsettings"
    ]
    assert len(names) == 1, f"expected one Microsoft.Web/sites/config 'appsettings', found {names}"
    return t.resource(names[0])[0]


def _union_args(t: Template) -> list[Any]:
    props = app_settings_node(t)["properties"]
    union = function_call(props, "union")
    if union is None:
        return [props]
    return [union[k] for k in sorted(union, key=lambda k: int(k.split("_")[-1]))]


def app_settings(t: Template, env: dict[str, Any]) -> dict[str, Any]:
    """The app settings a deployment with these parameter values would write."""
    merged: dict[str, Any] = {}
    for arg in _union_args(t):
        value = t.value(arg, {**REQUIRED_PARAMS, **env})
        if not isinstance(value, dict):
            raise Unsupported(f"union argument is not an object: {value!r}")
        merged.update(value)
    return merged


def setting_names(t: Template) -> tuple[set[str], set[str]]:
    """(settings always set, settings set only for some parameter values)."""
    always: set[str] | None = None
    sometimes: set[str] = set()
    # Every union argument is either an object, an object parameter, or `cond ? {..} : {..}`.
    for arg in _union_args(t):
        keys: list[set[str]] = []
        if isinstance(arg, dict) and "operator" in arg and arg["operator"]["type"] == "conditional":
            ops = arg["operator"]["operands"]
            keys = [set(map(unquote, ops["true_value"])), set(map(unquote, ops["false_value"]))]
            sometimes |= keys[0] ^ keys[1]
            always_here = keys[0] & keys[1]
        elif isinstance(arg, dict) and "operator" not in arg and "function" not in arg:
            always_here = set(map(unquote, arg))
        elif isinstance(arg, str) and arg in t.params:
            always_here = set()
        else:
            raise Unsupported(f"union argument {arg!r}")
        always = always_here if always is None else always | always_here
    return (always or set()), sometimes - (always or set())


@lru_cache(maxsize=None)
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8")


@lru_cache(maxsize=None)
def template(path: Path) -> Template:
    return Template.from_text(_read(path))


# ---------------------------------------------------------------------------------------------
# Structural checks (each returns a list of problems; [] is good)
# ---------------------------------------------------------------------------------------------


def check_storage(t: Template) -> list[str]:
    problems: list[str] = []
    accounts = t.of_type("Microsoft.Storage/storageAccounts")
    if len(accounts) != 1:
        return [f"expected one storage account, found {accounts}"]
    props = t.resource(accounts[0])[0].get("properties", {})
    expected = {
        "allowSharedKeyAccess": False,
        "allowBlobPublicAccess": False,
        "supportsHttpsTrafficOnly": True,
        "minimumTlsVersion": "TLS1_2",
    }
    for key, want in expected.items():
        if props.get(key) != want:
            problems.append(f"storage {key} is {props.get(key)!r}, want {want!r}")
    for name in t.of_type("Microsoft.Storage/storageAccounts/blobServices/containers"):
        access = t.resource(name)[0].get("properties", {}).get("publicAccess", "None")
        if access != "None":
            problems.append(f"container {name} publicAccess is {access!r}")
    return problems


def check_identity_storage_settings(t: Template, texts: list[str]) -> list[str]:
    problems: list[str] = []
    settings = app_settings(t, {})
    account = t.of_type("Microsoft.Storage/storageAccounts")[0]
    if settings.get("AzureWebJobsStorage__accountName") != Ref(f"{account}.name"):
        problems.append(
            "AzureWebJobsStorage__accountName must be the storage account name, got "
            f"{settings.get('AzureWebJobsStorage__accountName')!r}"
        )
    for name in settings:
        if name.startswith("AzureWebJobsStorage") and name not in (
            "AzureWebJobsStorage__accountName",
            "AzureWebJobsStorage__credential",
        ):
            problems.append(f"{name} is set: host storage must be identity-based")
    for name in ("STATE_CONNECTION", "WEBSITE_CONTENTAZUREFILECONNECTIONSTRING", "WEBSITE_CONTENTSHARE"):
        if name in settings:
            problems.append(f"{name} is set: it carries or needs a storage key")
    for text in texts:
        for needle in ("listKeys", "AccountKey", "DefaultEndpointsProtocol", "SharedAccessSignature"):
            if needle.lower() in text.lower():
                problems.append(f"{needle} appears in the Bicep: no storage keys")
    if settings.get("STATE_STORE") != "table":
        problems.append(f"STATE_STORE is {settings.get('STATE_STORE')!r}, want 'table'")
    endpoint = settings.get("STATE_TABLE_ENDPOINT")
    if endpoint != f"https://${{{account}.name}}.table.${{environment().suffixes.storage}}":
        problems.append(f"STATE_TABLE_ENDPOINT is {endpoint!r}")
    # Flex Consumption: deployment from a blob container with the app's own identity.
    site = t.resource("functionApp")[0]["properties"]
    storage = site.get("functionAppConfig", {}).get("deployment", {}).get("storage", {})
    if storage.get("type") != "blobContainer" or storage.get("authentication", {}).get("type") != "SystemAssignedIdentity":
        problems.append(f"Flex deployment storage must be a blob container with SystemAssignedIdentity: {storage!r}")
    return problems


_KV_REF = re.compile(r"^@Microsoft\.KeyVault\(SecretUri=\$\{(?P<base>\w+)\}/(?P<secret>[a-z0-9-]+)/\)$")


def check_secret_references(t: Template) -> list[str]:
    problems: list[str] = []
    secure_params = {p for p in t.params if t.is_secure(p)}
    for setting, (secret_name, param) in SECRET_SETTINGS.items():
        if param not in secure_params:
            problems.append(f"parameter {param} ({setting}) must be @secure()")
            continue
        if t.default(param) != "":
            problems.append(f"parameter {param} must default to ''")
        # The vault secret: created only when a value is given, holding that value.
        secrets = [
            n
            for n in t.of_type("Microsoft.KeyVault/vaults/secrets")
            if t.resource(n)[0].get("name") == secret_name
        ]
        if len(secrets) != 1:
            problems.append(f"expected one Key Vault secret {secret_name}, found {secrets}")
            continue
        body, condition = t.resource(secrets[0])
        if body.get("properties", {}).get("value") != param:
            problems.append(f"secret {secret_name} must hold parameter {param}")
        vault = body.get("parent")
        if t.resources.get(vault, {}).get("type") != "Microsoft.KeyVault/vaults":
            problems.append(f"secret {secret_name} parent {vault!r} is not a Key Vault")
        if condition is None or t.truth(condition, {param: ""}) or not t.truth(condition, {param: "x"}):
            problems.append(f"secret {secret_name} must be created exactly when {param} is given")

        # The app setting: a Key Vault reference, set when a value is given or the secret is
        # declared as already in the vault, absent otherwise.
        cases = {
            "no value": ({}, False),
            "value given": ({param: "https://example.invalid/x"}, True),
            "in vault": ({"secretsInVault": f"EMAIL_TO, {setting}"}, True),
        }
        for case, (env, present) in cases.items():
            settings = app_settings(t, env)
            if (setting in settings) != present:
                problems.append(f"{setting} ({case}): present={setting in settings}, want {present}")
            if setting not in settings:
                continue
            match = _KV_REF.match(str(settings[setting]))
            if not match:
                problems.append(f"{setting} is not a Key Vault reference: {settings[setting]!r}")
                continue
            if match["secret"] != secret_name:
                problems.append(f"{setting} references secret {match['secret']}, want {secret_name}")
            base = t.variables.get(match["base"], {}).get("value")
            if base != f"${{{vault}.properties.vaultUri}}secrets":
                problems.append(f"{setting}: {match['base']} must be the vault URI + 'secrets', got {base!r}")
    # No secure value may reach any app setting as plain text, whatever the parameters.
    everything = app_settings(t, {p: f"<<{p}>>" for p in secure_params} | {"secretsInVault": ""})
    for name, value in everything.items():
        if any(f"<<{p}>>" in str(value) for p in secure_params):
            problems.append(f"app setting {name} carries a secure parameter in plain text")
    raw = json.dumps(app_settings_node(t), default=str)
    for p in secure_params:
        if re.search(r"\$\{\s*" + re.escape(p) + r"\s*\}", raw):
            problems.append(f"app settings interpolate secure parameter {p}")
    return problems


def _role_assignments(t: Template) -> list[dict[str, Any]]:
    found = []
    for name in t.of_type("Microsoft.Authorization/roleAssignments"):
        body, condition = t.resource(name)
        props = body.get("properties", {})
        role = function_call(props.get("roleDefinitionId"), "subscription_resource_id") or {}
        guid = t.value(role.get("resource_name_1"), {}) if role else None
        found.append(
            {
                "name": name,
                "role": guid,
                "role_type": role.get("resource_type"),
                "scope": body.get("scope"),
                "principal": dotted(props.get("principalId")),
                "principal_type": props.get("principalType"),
                "condition": condition,
            }
        )
    return found


def check_role_assignments(main: Template, reader: Template) -> list[str]:
    problems: list[str] = []
    assignments = _role_assignments(main)
    for a in assignments:
        if a["role_type"] != "Microsoft.Authorization/roleDefinitions":
            problems.append(f"{a['name']}: roleDefinitionId must be subscriptionResourceId(roleDefinitions, <GUID>)")
    app = {(a["role"], a["scope"]) for a in assignments if a["principal"] == APP_PRINCIPAL}
    storage = main.of_type("Microsoft.Storage/storageAccounts")[0]
    vault = main.of_type("Microsoft.KeyVault/vaults")[0]
    want = {
        (ROLE_STORAGE_BLOB_DATA_OWNER, storage),
        (ROLE_STORAGE_TABLE_DATA_CONTRIBUTOR, storage),
        (ROLE_KEY_VAULT_SECRETS_USER, vault),
    }
    if app != want:
        problems.append(f"app identity roles {sorted(app)} != {sorted(want)}")
    for a in assignments:
        if a["principal"] == APP_PRINCIPAL:
            if a["condition"] is not None:
                problems.append(f"{a['name']} must not be conditional")
            if a["principal_type"] != "ServicePrincipal":
                problems.append(f"{a['name']} principalType must be ServicePrincipal")
        elif a["principal"] == "operatorPrincipalId":
            if a["role"] not in (ROLE_KEY_VAULT_SECRETS_OFFICER, ROLE_STORAGE_TABLE_DATA_CONTRIBUTOR):
                problems.append(f"{a['name']}: unexpected operator role {a['role']}")
            if a["condition"] is None or main.truth(a["condition"], {"operatorPrincipalId": ""}):
                problems.append(f"{a['name']} must exist only when operatorPrincipalId is given")
        else:
            problems.append(f"{a['name']}: unexpected principal {a['principal']!r}")

    # Log Analytics Reader on the existing Sentinel workspace, through a module deployed to the
    # workspace's own subscription and resource group, split from the resource id.
    readers = [
        n for n, m in main.modules.items() if str(m.get("detail", {}).get("path", "")).endswith("workspace-reader.bicep")
    ]
    if len(readers) != 1:
        return problems + [f"expected one workspace-reader module, found {readers}"]
    body, condition = main.module(readers[0])
    if condition is None or not main.truth(condition, {}) or main.truth(condition, {"querySource": "defender"}):
        problems.append("Log Analytics Reader must be granted exactly when QUERY_SOURCE=log_analytics")
    scope = function_call(body.get("scope"), "resource_group") or {}
    where = (
        main.value(scope.get("subscription_id"), REQUIRED_PARAMS),
        main.value(scope.get("resource_group_name"), REQUIRED_PARAMS),
    )
    if where != ("11111111-2222-3333-4444-555555555555", "rg-soc"):
        problems.append(f"workspace-reader module scope resolves to {where}, want the workspace's subscription and RG")
    params = body.get("params", {})
    if main.value(params.get("workspaceName"), REQUIRED_PARAMS) != "law-sentinel":
        problems.append("workspace-reader module must get the workspace name from the resource id")
    if dotted(params.get("principalId")) != APP_PRINCIPAL:
        problems.append("workspace-reader module must grant the app's identity")
    inner = _role_assignments(reader)
    if [(a["role"], a["principal"], a["principal_type"]) for a in inner] != [
        (ROLE_LOG_ANALYTICS_READER, "principalId", "ServicePrincipal")
    ]:
        problems.append(f"workspace-reader must assign exactly Log Analytics Reader: {inner}")
    elif not (
        reader.resources.get(inner[0]["scope"], {}).get("type") == "Microsoft.OperationalInsights/workspaces"
        and reader.resources[inner[0]["scope"]].get("existing") is True
        and reader.resource(inner[0]["scope"])[0].get("name") == "workspaceName"
    ):
        problems.append("Log Analytics Reader must be scoped to the EXISTING workspace")
    # The existing workspace read for LOG_ANALYTICS_WORKSPACE_ID, from the same parts.
    ws = [n for n, r in main.resources.items() if r.get("type") == "Microsoft.OperationalInsights/workspaces"]
    if len(ws) != 1 or main.resources[ws[0]].get("existing") is not True:
        problems.append(f"expected one existing workspace in main.bicep, found {ws}")
    else:
        wbody = main.resource(ws[0])[0]
        wscope = function_call(wbody.get("scope"), "resource_group") or {}
        got = (
            main.value(wscope.get("subscription_id"), REQUIRED_PARAMS),
            main.value(wscope.get("resource_group_name"), REQUIRED_PARAMS),
            main.value(wbody.get("name"), REQUIRED_PARAMS),
        )
        if got != ("11111111-2222-3333-4444-555555555555", "rg-soc", "law-sentinel"):
            problems.append(f"existing workspace resolves to {got}")
        if app_settings(main, {}).get("LOG_ANALYTICS_WORKSPACE_ID") != Ref(f"{ws[0]}.properties.customerId"):
            problems.append("LOG_ANALYTICS_WORKSPACE_ID must be the workspace customerId")
    return problems


def _mutated_text(path: Path, old: str, new: str) -> str:
    text = _read(path)
    assert old in text, f"mutation anchor not found in {path.name}: {old!r}"
    return text.replace(old, new, 1)


def _mutated(path: Path, old: str, new: str) -> Template:
    return Template.from_text(_mutated_text(path, old, new))


# ---------------------------------------------------------------------------------------------
# pycep: the structure
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", [MAIN_BICEP, MONITORING_BICEP, READER_BICEP], ids=lambda p: p.name)
def test_bicep_parses_with_pycep(path: Path) -> None:
    t = template(path)
    assert t.resources, f"{path.name}: no resources parsed"


def test_only_plain_bicep_syntax() -> None:
    # pycep (and so checkov) cannot read these newer forms; they would turn into parsing errors.
    for path in INFRA.rglob("*.bicep"):
        text = _read(path)
        assert not re.search(r"\b(string|int|bool|object)\[\]", text), f"{path.name}: typed array"
        code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("//"))
        assert not re.search(r"\.\.\.[A-Za-z_(\[{]", code), f"{path.name}: spread"
        assert not re.search(r"^\s*type\s+\w+\s*=", text, re.M), f"{path.name}: user-defined type"
        assert not re.search(r"^\s*func\s+\w+", text, re.M), f"{path.name}: user-defined function"


def test_storage_is_locked_down() -> None:
    assert check_storage(template(MAIN_BICEP)) == []
    # The ledger table lives in the same account, named by the parameter.
    t = template(MAIN_BICEP)
    tables = t.of_type("Microsoft.Storage/storageAccounts/tableServices/tables")
    assert [t.resource(n)[0]["name"] for n in tables] == ["stateTableName"]
    assert t.default("stateTableName") == "alerterstate"


def test_storage_check_catches_shared_keys() -> None:
    broken = _mutated(MAIN_BICEP, "allowSharedKeyAccess: false", "allowSharedKeyAccess: true")
    assert check_storage(broken) == ["storage allowSharedKeyAccess is True, want False"]


def _bicep_texts() -> list[str]:
    return [_read(p) for p in sorted(INFRA.rglob("*.bicep"))]


def test_identity_based_storage_settings() -> None:
    assert check_identity_storage_settings(template(MAIN_BICEP), _bicep_texts()) == []


def test_identity_check_catches_a_connection_string() -> None:
    text = _mutated_text(
        MAIN_BICEP,
        "AzureWebJobsStorage__accountName: storage.name",
        "AzureWebJobsStorage: 'DefaultEndpointsProtocol=https;AccountName=${storage.name}'",
    )
    problems = check_identity_storage_settings(Template.from_text(text), [text])
    assert any("AzureWebJobsStorage__accountName must be" in p for p in problems), problems
    assert any("AzureWebJobsStorage is set" in p for p in problems), problems
    assert any("DefaultEndpointsProtocol appears" in p for p in problems), problems


def test_secret_settings_are_key_vault_references() -> None:
    assert check_secret_references(template(MAIN_BICEP)) == []


def test_secret_check_catches_a_plain_value() -> None:
    broken = _mutated(
        MAIN_BICEP,
        "WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${kvSecretsBase}/webhook-secret/)'",
        "WEBHOOK_SECRET: webhookSecret",
    )
    problems = check_secret_references(broken)
    assert "app setting WEBHOOK_SECRET carries a secure parameter in plain text" in problems, problems


def test_secret_check_catches_a_reference_to_a_missing_secret() -> None:
    broken = _mutated(MAIN_BICEP, "useSmtpPassword ? {", "true ? {")
    problems = check_secret_references(broken)
    assert "SMTP_PASSWORD (no value): present=True, want False" in problems, problems


def test_key_vault_is_rbac_with_purge_protection() -> None:
    t = template(MAIN_BICEP)
    (vault,) = t.of_type("Microsoft.KeyVault/vaults")
    props = t.resource(vault)[0]["properties"]
    assert props["enableRbacAuthorization"] is True
    assert props["enablePurgeProtection"] is True
    assert props["enableSoftDelete"] is True
    assert "accessPolicies" not in props


def test_role_assignments_least_privilege() -> None:
    assert check_role_assignments(template(MAIN_BICEP), template(READER_BICEP)) == []


def test_role_check_catches_a_broader_role() -> None:
    contributor = "b24988ac-6180-42a0-ab88-20f7382dd24c"
    broken = _mutated(
        MAIN_BICEP,
        f"var storageTableDataContributorRoleId = '{ROLE_STORAGE_TABLE_DATA_CONTRIBUTOR}'",
        f"var storageTableDataContributorRoleId = '{contributor}'",
    )
    problems = check_role_assignments(broken, template(READER_BICEP))
    assert any(p.startswith("app identity roles") for p in problems), problems


def test_role_check_catches_a_wrong_workspace_split() -> None:
    broken = _mutated(
        MAIN_BICEP,
        "var workspaceResourceGroupName = workspaceIdParts[4]",
        "var workspaceResourceGroupName = workspaceIdParts[3]",
    )
    problems = check_role_assignments(broken, template(READER_BICEP))
    assert any("workspace-reader module scope resolves to" in p for p in problems), problems


def test_function_app_is_flex_consumption_python_311_with_identity() -> None:
    t = template(MAIN_BICEP)
    (plan,) = t.of_type("Microsoft.Web/serverfarms")
    plan_body = t.resource(plan)[0]
    assert plan_body["sku"] == {"tier": "FlexConsumption", "name": "FC1"}
    assert plan_body["properties"]["reserved"] is True
    (site,) = t.of_type("Microsoft.Web/sites")
    body = t.resource(site)[0]
    assert body["kind"] == "functionapp,linux"
    assert body["identity"] == {"type": "SystemAssigned"}
    props = body["properties"]
    assert dotted(props["serverFarmId"]) == f"{plan}.id"
    assert props["httpsOnly"] is True
    assert props["siteConfig"]["minTlsVersion"] == "1.2"
    assert props["siteConfig"]["ftpsState"] == "Disabled"
    assert props["functionAppConfig"]["runtime"] == {"name": "python", "version": "3.11"}
    # Settings that Flex Consumption rejects or ignores are not set.
    settings = app_settings(t, {})
    for name in (
        "FUNCTIONS_WORKER_RUNTIME",
        "FUNCTIONS_EXTENSION_VERSION",
        "WEBSITE_RUN_FROM_PACKAGE",
        "SCM_DO_BUILD_DURING_DEPLOYMENT",
        "ENABLE_ORYX_BUILD",
    ):
        assert name not in settings
    assert "linuxFxVersion" not in props["siteConfig"]
    # The deployment container is in the app's storage account.
    deployment = props["functionAppConfig"]["deployment"]["storage"]["value"]
    (container,) = t.of_type("Microsoft.Storage/storageAccounts/blobServices/containers")
    assert deployment == f"${{storage.properties.primaryEndpoints.blob}}${{{t.resource(container)[0]['name']}}}"


def test_app_settings_from_parameters() -> None:
    t = template(MAIN_BICEP)
    defaults = app_settings(t, {})
    assert defaults["ALERT_SCHEDULE"] == "0 0 */4 * * *"
    assert defaults["QUERY_SOURCE"] == "log_analytics"
    assert defaults["STATE_STORE"] == "table"
    assert defaults["STATE_TABLE_NAME"] == "alerterstate"
    # Optional plain settings are absent when empty (the app's default applies) ...
    for absent in ("DETECTIONS", "EMAIL_TO", "EMAIL_FROM", "SMTP_HOST", "SMTP_PORT", "SMTP_USERNAME",
                   "SMTP_SECURITY", "GRAPH_MAIL_SENDER", "REALERT_AFTER"):
        assert absent not in defaults, absent
    # ... and carry the parameter when given.
    given = app_settings(
        t,
        {
            "querySource": "defender",
            "alertSchedule": "0 30 */2 * * *",
            "detections": "panorama9*",
            "emailTo": "soc@example.org",
            "emailFrom": "alerter@example.org",
            "smtpHost": "smtp.example.org",
            "smtpPort": "465",
            "smtpUsername": "alerter",
            "smtpSecurity": "ssl",
            "graphMailSender": "alerter@example.org",
            "realertAfter": "30d",
            "stateTableName": "ledger",
            "extraAppSettings": {"SUPPRESSIONS_PATH": "suppressions.yaml", "STATE_STORE": "sqlite"},
        },
    )
    assert given["QUERY_SOURCE"] == "defender"
    assert given["ALERT_SCHEDULE"] == "0 30 */2 * * *"
    assert given["DETECTIONS"] == "panorama9*"
    assert given["SMTP_PORT"] == "465"
    assert given["SMTP_SECURITY"] == "ssl"
    assert given["GRAPH_MAIL_SENDER"] == "alerter@example.org"
    assert given["REALERT_AFTER"] == "30d"
    assert given["STATE_TABLE_NAME"] == "ledger"
    assert given["SUPPRESSIONS_PATH"] == "suppressions.yaml"
    # extraAppSettings cannot override what the template manages.
    assert given["STATE_STORE"] == "table"


def _doc_section(heading: str) -> str:
    text = _read(DEPLOY_DOC)
    match = re.search(rf"^## {re.escape(heading)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"docs/deploy.md has no '## {heading}' section"
    return match.group(1)


def _documented_optional_settings() -> set[str]:
    # The first cell of each table row in that section names optional settings.
    return {
        name
        for line in _doc_section("Settings the template does not always set").splitlines()
        if line.startswith("| `")
        for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", line.split("|")[1])
    }


def test_every_setting_is_set_or_documented_optional() -> None:
    always, sometimes = setting_names(template(MAIN_BICEP))
    optional = _documented_optional_settings()
    missing = [s for s in INTERFACE_SETTINGS if s not in always and s not in optional]
    assert missing == [], f"set these in infra/main.bicep or list them as optional in docs/deploy.md: {missing}"
    # A setting the template sets only sometimes is absent by default: it must be documented too.
    undocumented = sorted(s for s in sometimes if s not in optional)
    assert undocumented == [], f"conditionally set, not documented as optional: {undocumented}"
    # And the documented list names only real settings.
    unknown = sorted(optional - set(INTERFACE_SETTINGS) - set(EXTRA_APP_SETTINGS))
    assert unknown == [], f"docs/deploy.md lists settings the app does not read: {unknown}"


def test_settings_the_app_reads_are_set_or_documented() -> None:
    # The app may read more than interfaces.md lists (tuning knobs): each is set or optional.
    settings_py = REPO / "alerter" / "settings.py"
    if not settings_py.is_file():
        pytest.skip("alerter/settings.py not present")
    read = set(re.findall(r"""self\.\w+\(\s*["']([A-Z][A-Z0-9_]{2,})["']""", _read(settings_py)))
    assert {"ALERT_SCHEDULE", "STATE_TABLE_ENDPOINT"} <= read, "the settings reader changed shape"
    always, _ = setting_names(template(MAIN_BICEP))
    optional = _documented_optional_settings()
    missing = sorted(read - always - optional)
    assert missing == [], (
        f"alerter/settings.py reads these: set them in infra/main.bicep or document them as optional: {missing}"
    )


def test_interface_settings_list_matches_shared_doc() -> None:
    if not SHARED_INTERFACES.is_file():
        pytest.skip(f"{SHARED_INTERFACES} not present; the embedded list is used")
    text = _read(SHARED_INTERFACES)
    table = re.search(r"^## Settings.*?\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert table
    names: list[str] = []
    for line in table.group(1).splitlines():
        if line.startswith("| `"):
            first_cell = line.split("|")[1]
            names += re.findall(r"`([A-Z][A-Z0-9_]+)`", first_cell)
    assert sorted(names) == sorted(INTERFACE_SETTINGS)


def test_monitoring_alert_rules() -> None:
    main, mon = template(MAIN_BICEP), template(MONITORING_BICEP)
    (ai,) = mon.of_type("Microsoft.Insights/components")
    (law,) = mon.of_type("Microsoft.OperationalInsights/workspaces")
    assert dotted(mon.resource(ai)[0]["properties"]["WorkspaceResourceId"]) == f"{law}.id"
    assert dotted(mon.outputs["appInsightsConnectionString"]["value"]) == f"{ai}.properties.ConnectionString"
    rules = {n: mon.resource(n)[0]["properties"] for n in mon.of_type("Microsoft.Insights/scheduledQueryRules")}
    assert len(rules) == 2, rules.keys()
    by_op = {}
    for name, props in rules.items():
        assert [dotted(s) for s in props["scopes"]] == [f"{ai}.id"], name
        (criterion,) = props["criteria"]["allOf"]
        by_op[criterion["operator"]] = (props, criterion, str(mon.value(criterion["query"], {})))
    failed_props, failed, failed_query = by_op["GreaterThan"]
    assert failed["threshold"] == 0 and failed["timeAggregation"] == "Count"
    assert failed_query.startswith("requests") and "success == false" in failed_query
    assert "cloud_RoleName =~ \\'${functionAppName}\\'" in failed_query
    missed_props, missed, missed_query = by_op["LessThan"]
    assert missed["threshold"] == 1 and missed["timeAggregation"] == "Count"
    assert missed_query.startswith("requests") and "${functionAppName}" in missed_query
    assert missed_props["windowSize"] == "PT${missedRunAlertHours}H"
    assert mon.default("missedRunAlertHours") == 8 and main.default("missedRunAlertHours") == 8
    # main.bicep wires the module to the same app name and connection string.
    (mod,) = [n for n, m in main.modules.items() if str(m["detail"]["path"]).endswith("monitoring.bicep")]
    params = main.module(mod)[0]["params"]
    assert params["functionAppName"] == "functionAppName"
    assert main.resource("functionApp")[0]["name"] == "functionAppName"
    assert params["missedRunAlertHours"] == "missedRunAlertHours"
    connection = app_settings(main, {})["APPLICATIONINSIGHTS_CONNECTION_STRING"]
    assert connection == Ref(f"{mod}.outputs.appInsightsConnectionString")


def test_azure_yaml_matches_the_template() -> None:
    import yaml

    config = yaml.safe_load(_read(AZURE_YAML))
    assert config["infra"]["provider"] == "bicep"
    assert (REPO / config["infra"]["path"] / f"{config['infra']['module']}.bicep") == MAIN_BICEP
    ((service, spec),) = config["services"].items()
    assert spec == {"project": ".", "language": "python", "host": "function"}
    tags = function_call(template(MAIN_BICEP).resource("functionApp")[0]["tags"], "union")
    assert tags and {unquote(k): v for k, v in tags["arg_2"].items()} == {"azd-service-name": service}


def test_parameters_file_matches_the_template() -> None:
    t = template(MAIN_BICEP)
    given = json.loads(_read(PARAMETERS_JSON))["parameters"]
    assert sorted(set(given) - set(t.params)) == []
    required = {p for p in t.params if t.default(p) is None}
    assert required == set(REQUIRED_PARAMS)
    assert required <= set(given)
    # Secrets never go through azd's plain-text environment files.
    assert not [p for p in given if t.is_secure(p)]


# ---------------------------------------------------------------------------------------------
# .funcignore
# ---------------------------------------------------------------------------------------------


def _funcignore_patterns() -> list[str]:
    return [line.strip() for line in _read(FUNCIGNORE).splitlines() if line.strip() and not line.startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """gitignore-style match (no negation): a pattern matches a path or any of its parents."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        pattern = pattern.rstrip("/")
        if pattern.startswith("/"):
            if any(fnmatch.fnmatchcase(prefix, pattern[1:]) for prefix in prefixes):
                return True
        elif "/" in pattern:
            if any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes):
                return True
        elif any(fnmatch.fnmatchcase(part, pattern) for part in parts):
            return True
    return False


def test_funcignore_keeps_only_what_runs() -> None:
    patterns = _funcignore_patterns()
    assert "!" not in "".join(p[0] for p in patterns)
    kept = [
        "function_app.py",
        "host.json",
        "requirements.txt",
        "alerter/__init__.py",
        "alerter/__main__.py",
        "alerter/cycle.py",
        "alerter/data/schema.json",
        "notifiers/teams.py",
        "notifiers/templates/card.json",
        "detections/panorama9-filesig.yaml",
        "detections/catalog/other.yaml",
    ]
    dropped = [
        "tests/test_infra.py",
        "tests/fixtures/x.json",
        "conftest.py",
        ".venv/lib/python3.11/site-packages/x.py",
        ".venv-tools/bin/checkov",
        "node_modules/azurite/package.json",
        "package.json",
        "infra/main.bicep",
        "docs/deploy.md",
        "README.md",
        "Makefile",
        "azure.yaml",
        "local.settings.json",
        "local.settings.sample.json",
        "requirements-dev.txt",
        ".git/config",
        ".ci/run",
        "alerter/__pycache__/cycle.cpython-311.pyc",
        ".pytest_cache/v/cache",
        ".alerter/state.db",
        "samples/export.jsonl",
        "benchmarks/bench_ledger.py",
        "bench/run.py",
        "tools/card_preview.js",
        "samples/demo.settings.json",
        ".demo/state.db",
        "pytest.ini",
        "package-lock.json",
    ]
    assert [p for p in kept if ignored(p, patterns)] == []
    assert [p for p in dropped if not ignored(p, patterns)] == []


# ---------------------------------------------------------------------------------------------
# infra/grant-graph-permissions.sh against a recording stand-in for `az`
# ---------------------------------------------------------------------------------------------

GRAPH_SP = "9a9a9a9a-0000-0000-0000-000000000001"
PRINCIPAL = "5e5e5e5e-0000-0000-0000-000000000002"
GRAPH_ROLES = {
    "ThreatHunting.Read.All": "dd98c7f5-2d42-42d3-a0e4-633161547251",
    "Mail.Send": "b633e1c5-b582-4048-a93e-9f11b44c7e96",
}

_AZ_STUB = r'''
import json, os, re, sys
state_path = os.environ["AZ_STUB_STATE"]
state = json.load(open(state_path))
args = sys.argv[1:]
with open(os.environ["AZ_STUB_LOG"], "a") as log:
    log.write(json.dumps(args) + "\n")
def opt(name):
    return args[args.index(name) + 1] if name in args else ""
def out(value):
    print(value)
    sys.exit(0)
if args[:2] == ["account", "show"]:
    sys.exit(0 if state.get("logged_in", True) else 1)
if args[:3] == ["functionapp", "identity", "show"]:
    out(state["principal"] if opt("--name") == state["app"] else "")
if args[:2] == ["cloud", "show"]:
    out("https://graph.microsoft.com/")
if args and args[0] == "rest":
    method, url, query = opt("--method").lower(), opt("--url"), opt("--query")
    if method == "get" and url.endswith("/v1.0/servicePrincipals(appId='00000003-0000-0000-c000-000000000000')?$select=id"):
        out(state["graph_sp"])
    m = re.search(r"/v1\.0/servicePrincipals/([^/?]+)\?\$select=appRoles$", url)
    if method == "get" and m and m.group(1) == state["graph_sp"]:
        q = re.fullmatch(r"appRoles\[\?value=='([^']+)' && contains\(allowedMemberTypes, 'Application'\)\]\.id \| \[0\]", query)
        out(state["roles"].get(q.group(1), "") if q else "UNEXPECTED-QUERY")
    m = re.search(r"/v1\.0/servicePrincipals/([^/?]+)/appRoleAssignments$", url)
    if m and m.group(1) == state["principal"]:
        if method == "get":
            q = re.fullmatch(r"value\[\?resourceId=='([^']+)' && appRoleId=='([^']+)'\]\.id \| \[0\]", query)
            hits = [a["id"] for a in state["assigned"] if q and a["resourceId"] == q.group(1) and a["appRoleId"] == q.group(2)]
            out(hits[0] if hits else "")
        if method == "post":
            body = json.loads(opt("--body"))
            body["id"] = "assignment-%d" % len(state["assigned"])
            state["assigned"].append(body)
            json.dump(state, open(state_path, "w"))
            sys.exit(0)
sys.stderr.write("az stub: unexpected call %r\n" % (args,))
sys.exit(3)
'''


@pytest.fixture()
def az_stub(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    az = bin_dir / "az"
    az.write_text(f"#!{sys.executable}\n" + textwrap.dedent(_AZ_STUB))
    az.chmod(az.stat().st_mode | stat.S_IEXEC)
    state = tmp_path / "state.json"
    state.write_text(
        json.dumps(
            {"principal": PRINCIPAL, "app": "func-alerter-x", "graph_sp": GRAPH_SP, "roles": GRAPH_ROLES, "assigned": []}
        )
    )
    log = tmp_path / "az.log"
    log.write_text("")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "AZ_STUB_STATE": str(state),
            "AZ_STUB_LOG": str(log),
            "HOME": str(tmp_path),
        }
        result = subprocess.run(["bash", str(GRANT_SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60)
        result.calls = [json.loads(line) for line in log.read_text().splitlines()]  # type: ignore[attr-defined]
        result.assigned = json.loads(state.read_text())["assigned"]  # type: ignore[attr-defined]
        log.write_text("")
        return result

    return run


def _posts(result: Any) -> list[dict[str, Any]]:
    return [json.loads(c[c.index("--body") + 1]) for c in result.calls if c[:1] == ["rest"] and "post" in c]


def test_grant_script_is_strict_bash() -> None:
    text = _read(GRANT_SCRIPT)
    assert text.startswith("#!/usr/bin/env bash\n")
    assert re.search(r"^set -euo pipefail$", text, re.M)
    assert "00000003-0000-0000-c000-000000000000" in text
    assert "Privileged Role Administrator" in text and "Global Administrator" in text
    assert os.access(GRANT_SCRIPT, os.X_OK), "infra/grant-graph-permissions.sh must be executable"
    subprocess.run(["bash", "-n", str(GRANT_SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        proc = subprocess.run(["shellcheck", str(GRANT_SCRIPT)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout


def test_grant_script_grants_both_roles_once(az_stub: Callable[..., Any]) -> None:
    first = az_stub("--principal-id", PRINCIPAL)
    assert first.returncode == 0, first.stderr
    assert _posts(first) == [
        {"principalId": PRINCIPAL, "resourceId": GRAPH_SP, "appRoleId": GRAPH_ROLES["ThreatHunting.Read.All"]},
        {"principalId": PRINCIPAL, "resourceId": GRAPH_SP, "appRoleId": GRAPH_ROLES["Mail.Send"]},
    ]
    assert "Mail.Send is tenant-wide" in first.stdout
    second = az_stub("--principal-id", PRINCIPAL)
    assert second.returncode == 0, second.stderr
    assert _posts(second) == []
    assert second.stdout.count("already granted") == 2
    assert len(second.assigned) == 2


def test_grant_script_finds_the_app_identity_and_honours_permissions(az_stub: Callable[..., Any]) -> None:
    result = az_stub("-g", "rg-alerter", "-n", "func-alerter-x", "--permissions", "ThreatHunting.Read.All")
    assert result.returncode == 0, result.stderr
    hunting = GRAPH_ROLES["ThreatHunting.Read.All"]
    assert _posts(result) == [{"principalId": PRINCIPAL, "resourceId": GRAPH_SP, "appRoleId": hunting}]
    assert "Mail.Send" not in result.stdout


def test_grant_script_dry_run_and_errors(az_stub: Callable[..., Any]) -> None:
    dry = az_stub("--principal-id", PRINCIPAL, "--dry-run")
    assert dry.returncode == 0 and _posts(dry) == [] and dry.stdout.count("would grant") == 2
    unknown = az_stub("--principal-id", PRINCIPAL, "--permissions", "Mail.ReadWrite.Everything")
    assert unknown.returncode == 2 and "no application permission 'Mail.ReadWrite.Everything'" in unknown.stderr
    assert _posts(unknown) == []
    no_target = az_stub()
    assert no_target.returncode == 2 and "--principal-id" in no_target.stderr
    bad_id = az_stub("--principal-id", "x; rm -rf /")
    assert bad_id.returncode == 2 and _posts(bad_id) == []


# ---------------------------------------------------------------------------------------------
# checkov
# ---------------------------------------------------------------------------------------------


def run_checkov(directory: Path) -> dict[str, Any]:
    proc = subprocess.run(
        [checkov_bin(), "-d", str(directory), "--skip-download", "-o", "json", "--framework", "bicep"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=directory,
    )
    assert proc.returncode in (0, 1), f"checkov exited {proc.returncode}:\n{proc.stderr[-2000:]}"
    report = json.loads(proc.stdout)
    reports = report if isinstance(report, list) else [report]
    (bicep,) = [r for r in reports if r.get("check_type") == "bicep"]
    return bicep


@pytest.fixture(scope="module")
def checkov_report() -> dict[str, Any]:
    return run_checkov(INFRA)


def _results(report: dict[str, Any], kind: str) -> list[tuple[str, str]]:
    return [(c["check_id"], c["resource"]) for c in report["results"][kind]]


def accepted_findings() -> dict[str, str]:
    section = _doc_section("Accepted checkov findings")
    rows: dict[str, str] = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and re.fullmatch(r"`?CKV2?_AZURE_\d+`?", cells[0]):
            rows[cells[0].strip("`")] = cells[-1]
    return rows


def test_checkov_parses_every_file(checkov_report: dict[str, Any]) -> None:
    summary = checkov_report["summary"]
    assert summary["parsing_errors"] == 0, summary
    assert summary["resource_count"] >= 20, summary
    files = {c["file_path"] for c in checkov_report["results"]["passed_checks"] + checkov_report["results"]["failed_checks"]}
    assert any(f.endswith("main.bicep") for f in files)


def test_required_checks_pass_everywhere(checkov_report: dict[str, Any]) -> None:
    passed = _results(checkov_report, "passed_checks")
    failed = _results(checkov_report, "failed_checks")
    for check_id, resource in REQUIRED_CHECKS.items():
        assert (check_id, resource) in passed, f"{check_id} did not pass on {resource}"
    assert [f for f in failed if f[0] in REQUIRED_CHECKS] == []
    assert [s for s in _results(checkov_report, "skipped_checks") if s[0] in REQUIRED_CHECKS] == []


def test_failing_checks_are_documented(checkov_report: dict[str, Any]) -> None:
    accepted = accepted_findings()
    failing = {check for check, _ in _results(checkov_report, "failed_checks")}
    failing |= {check for check, _ in _results(checkov_report, "skipped_checks")}
    undocumented = sorted(failing - set(accepted))
    assert undocumented == [], f"list these in docs/deploy.md 'Accepted checkov findings' with a reason: {undocumented}"
    stale = sorted(set(accepted) - failing)
    assert stale == [], f"these pass now: remove them from docs/deploy.md 'Accepted checkov findings': {stale}"
    short = sorted(c for c, reason in accepted.items() if len(reason) < 30)
    assert short == [], f"give a real reason for {short}"
    assert not set(accepted) & set(REQUIRED_CHECKS)


def test_checkov_gate_catches_regressions(tmp_path: Path) -> None:
    copy = tmp_path / "infra"
    shutil.copytree(INFRA, copy)
    main = copy / "main.bicep"
    text = main.read_text()
    for old, new in (
        ("httpsOnly: true", "httpsOnly: false"),
        ("ftpsState: 'Disabled'", "ftpsState: 'AllAllowed'"),
        ("minimumTlsVersion: 'TLS1_2'", "minimumTlsVersion: 'TLS1_0'"),
    ):
        assert old in text
        text = text.replace(old, new, 1)
    main.write_text(text)
    report = run_checkov(copy)
    failed = set(_results(report, "failed_checks"))
    assert {("CKV_AZURE_14", SITE), ("CKV_AZURE_78", SITE), ("CKV_AZURE_44", STORAGE)} <= failed


def test_checkov_reports_unparsable_bicep(tmp_path: Path) -> None:
    # The quirk this suite guards against: a file pycep cannot read is not a failure for checkov
    # (exit code 0), only a parsing error in the summary.
    (tmp_path / "new.bicep").write_text("param names string[]\nvar all = [...names]\n")
    report = run_checkov(tmp_path)
    assert report["summary"]["parsing_errors"] == 1

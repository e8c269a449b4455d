#!/usr/bin/env bash
# Grant the alerter's managed identity Microsoft Graph APPLICATION permissions (app roles):
#
#   ThreatHunting.Read.All  QUERY_SOURCE=defender: POST /v1.0/security/runHuntingQuery
#   Mail.Send               GRAPH_MAIL_SENDER set: POST /v1.0/users/{sender}/sendMail
#
# Managed identities have no "API permissions" page and no consent prompt: an app role is
# granted by creating an appRoleAssignment on the identity's service principal, which is itself
# the admin consent. Who may run this script:
#
#   - Privileged Role Administrator or Global Administrator in Microsoft Entra ID: granting app
#     roles of Microsoft Graph is reserved to them (Application Administrator and Cloud
#     Application Administrator cannot grant Microsoft Graph app roles);
#   - signed in with `az login` (the Azure CLI token carries the signed-in user's directory role).
#
# Idempotent: a permission that is already granted is reported and left alone; running the
# script twice changes nothing the second time.
#
# Mail.Send granted here is TENANT-WIDE: the identity could send as any mailbox. Scope it to the
# one sender mailbox in Exchange Online (docs/deploy.md, "Scope Mail.Send to one mailbox"), or
# do not grant it here at all and use Exchange "RBAC for Applications" instead
# (--permissions ThreatHunting.Read.All).
#
# Usage:
#   infra/grant-graph-permissions.sh -g <resource-group> -n <function-app-name> [options]
#   infra/grant-graph-permissions.sh --principal-id <object-id> [options]
#
# Options:
#   -g, --resource-group RG    resource group of the Function App
#   -n, --name APP             Function App name (its system-assigned identity is used)
#   -p, --principal-id ID      object id of the managed identity's service principal
#                              (output AZURE_FUNCTION_PRINCIPAL_ID of infra/main.bicep)
#   --permissions LIST         comma list of Graph application permissions
#                              (default: ThreatHunting.Read.All,Mail.Send)
#   --dry-run                  show what would be granted, change nothing
#   -h, --help                 this text
#
# Environment: GRAPH_URL overrides the Microsoft Graph endpoint (default: the current az cloud's).

set -euo pipefail

readonly GRAPH_APP_ID="00000003-0000-0000-c000-000000000000" # Microsoft Graph

resource_group=""
app_name=""
principal_id=""
permissions="ThreatHunting.Read.All,Mail.Send"
dry_run=false

usage() {
  sed -n '2,/^set -euo pipefail/p' "$0" | sed -e '/^set -euo pipefail/d' -e 's/^# \{0,1\}//'
}

die() {
  echo "grant-graph-permissions: $*" >&2
  exit 2
}

while [ $# -gt 0 ]; do
  case "$1" in
    -g | --resource-group) [ $# -ge 2 ] || die "$1 needs a value"; resource_group="$2"; shift 2 ;;
    -n | --name) [ $# -ge 2 ] || die "$1 needs a value"; app_name="$2"; shift 2 ;;
    -p | --principal-id) [ $# -ge 2 ] || die "$1 needs a value"; principal_id="$2"; shift 2 ;;
    --permissions) [ $# -ge 2 ] || die "$1 needs a value"; permissions="$2"; shift 2 ;;
    --dry-run) dry_run=true; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument: $1 (see --help)" ;;
  esac
done

command -v az >/dev/null 2>&1 || die "the Azure CLI (az) is not on PATH"
az account show --output none 2>/dev/null || die "not signed in: run 'az login' as a Privileged Role Administrator or Global Administrator"

if [ -z "$principal_id" ]; then
  if [ -z "$resource_group" ] || [ -z "$app_name" ]; then
    die "give --principal-id, or both --resource-group and --name"
  fi
  principal_id="$(az functionapp identity show --resource-group "$resource_group" --name "$app_name" --query principalId --output tsv)"
  [ -n "$principal_id" ] || die "Function App '$app_name' has no system-assigned identity (deploy infra/main.bicep first)"
fi
case "$principal_id" in
  *[!0-9a-fA-F-]* | "") die "not an object id: '$principal_id'" ;;
esac

graph="${GRAPH_URL:-}"
if [ -z "$graph" ]; then
  graph="$(az cloud show --query endpoints.microsoftGraphResourceId --output tsv 2>/dev/null || true)"
fi
graph="${graph:-https://graph.microsoft.com}"
graph="${graph%/}"

# The Microsoft Graph service principal in this tenant, and its application roles.
graph_sp_id="$(az rest --method get \
  --url "$graph/v1.0/servicePrincipals(appId='$GRAPH_APP_ID')?\$select=id" \
  --query id --output tsv)"
[ -n "$graph_sp_id" ] || die "Microsoft Graph service principal not found in this tenant"

echo "Managed identity (service principal): $principal_id"
echo "Microsoft Graph service principal:    $graph_sp_id"

granted_mail_send=false
IFS=',' read -r -a wanted <<<"$permissions"
[ "${#wanted[@]}" -gt 0 ] || die "--permissions is empty"

for permission in "${wanted[@]}"; do
  permission="${permission// /}"
  [ -n "$permission" ] || continue
  case "$permission" in
    *[!A-Za-z0-9.]*) die "not a permission name: '$permission'" ;;
  esac

  role_id="$(az rest --method get \
    --url "$graph/v1.0/servicePrincipals/$graph_sp_id?\$select=appRoles" \
    --query "appRoles[?value=='$permission' && contains(allowedMemberTypes, 'Application')].id | [0]" \
    --output tsv)"
  if [ -z "$role_id" ] || [ "$role_id" = "None" ]; then
    die "Microsoft Graph has no application permission '$permission'"
  fi

  existing="$(az rest --method get \
    --url "$graph/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
    --query "value[?resourceId=='$graph_sp_id' && appRoleId=='$role_id'].id | [0]" \
    --output tsv)"

  if [ -n "$existing" ] && [ "$existing" != "None" ]; then
    echo "already granted: $permission"
  elif [ "$dry_run" = true ]; then
    echo "would grant:     $permission (app role $role_id)"
  else
    az rest --method post \
      --url "$graph/v1.0/servicePrincipals/$principal_id/appRoleAssignments" \
      --headers "Content-Type=application/json" \
      --body "{\"principalId\":\"$principal_id\",\"resourceId\":\"$graph_sp_id\",\"appRoleId\":\"$role_id\"}" \
      --output none
    echo "granted:         $permission"
  fi
  if [ "$permission" = "Mail.Send" ]; then
    granted_mail_send=true
  fi
done

echo "Tokens the app already holds keep their old roles until they expire (up to 24 hours);"
echo "restart the Function App to pick the new permissions up sooner."
if [ "$granted_mail_send" = true ]; then
  echo "Mail.Send is tenant-wide: restrict it to the sender mailbox in Exchange Online"
  echo "(docs/deploy.md, 'Scope Mail.Send to one mailbox')."
fi

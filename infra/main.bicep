// The RMM signer alerter, deployed beside Microsoft Sentinel.
//
//   az deployment group create -g <rg> -f infra/main.bicep -p environmentName=<name> sentinelWorkspaceResourceId=<id> ...
//   azd up            (azure.yaml at the repository root; parameters in infra/main.parameters.json)
//
// What it creates in the target resource group:
//   - a Flex Consumption (FC1) Linux Function App, Python 3.11, with a system-assigned identity;
//   - a storage account used only with Entra ID (no shared keys): host storage
//     (AzureWebJobsStorage__accountName), the deployment package container and the ledger table;
//   - a Key Vault (RBAC mode, soft delete, purge protection) for the four secret settings, which
//     the app reads through Key Vault references, never as plain values;
//   - Log Analytics + Application Insights for the app's own telemetry, with two alert rules
//     (a failed run; no run for two schedule periods), see modules/monitoring.bicep;
//   - least-privilege role assignments for the app's identity: Log Analytics Reader on the
//     EXISTING Sentinel workspace (any resource group or subscription), Storage Blob Data Owner and
//     Storage Table Data Contributor on the storage account, Key Vault Secrets User on the vault.
//
// Plain Bicep on purpose: checkov parses it with pycep, which does not know typed arrays, spread,
// user-defined types or lambdas.

targetScope = 'resourceGroup'

// ---------------------------------------------------------------------------------------------
// Parameters: naming and placement
// ---------------------------------------------------------------------------------------------

@description('Environment name (azd sets it from AZURE_ENV_NAME). Part of the unique suffix and of the azd-env-name tag.')
@minLength(1)
@maxLength(64)
param environmentName string

@description('Azure region for every resource. Must offer the Flex Consumption plan.')
param location string = resourceGroup().location

@description('Short lowercase prefix for resource names (letters and digits).')
@minLength(2)
@maxLength(10)
param namePrefix string = 'alerter'

// ---------------------------------------------------------------------------------------------
// Parameters: what to query
// ---------------------------------------------------------------------------------------------

@description('Resource id of the EXISTING Log Analytics workspace that Microsoft Sentinel uses: /subscriptions/<sub>/resourceGroups/<rg>/providers/Microsoft.OperationalInsights/workspaces/<name>. It may live in another resource group or subscription.')
@minLength(60)
param sentinelWorkspaceResourceId string

@description('QUERY_SOURCE: log_analytics (Sentinel workspace, needs Log Analytics Reader, granted here) or defender (Defender XDR advanced hunting through Microsoft Graph, needs ThreatHunting.Read.All, granted by infra/grant-graph-permissions.sh).')
@allowed([
  'log_analytics'
  'defender'
])
param querySource string = 'log_analytics'

@description('ALERT_SCHEDULE: NCRONTAB with six fields, seconds first, UTC.')
param alertSchedule string = '0 0 */4 * * *'

@description('DETECTIONS: comma list of detection ids, names or globs to enable. Empty: the app default (every file directly in detections/).')
param detections string = ''

@description('REALERT_AFTER: re-notify a device still seen this long after its last notification (30d, 12h). Empty: never.')
param realertAfter string = ''

@description('STATE_TABLE_NAME: the delivery ledger table in the app\'s storage account.')
@minLength(3)
@maxLength(63)
param stateTableName string = 'alerterstate'

// ---------------------------------------------------------------------------------------------
// Parameters: channels (plain settings)
// ---------------------------------------------------------------------------------------------

@description('EMAIL_TO: comma list of recipients. Empty: no e-mail channel.')
param emailTo string = ''

@description('EMAIL_FROM: sender address (required with EMAIL_TO).')
param emailFrom string = ''

@description('SMTP_HOST: SMTP relay. Empty with GRAPH_MAIL_SENDER set: mail goes through Graph.')
param smtpHost string = ''

@description('SMTP_PORT. Empty: the app default (587).')
param smtpPort string = ''

@description('SMTP_USERNAME. Empty: no SMTP authentication.')
param smtpUsername string = ''

@description('SMTP_SECURITY: starttls, ssl or none. Empty: the app default (starttls).')
@allowed([
  ''
  'starttls'
  'ssl'
  'none'
])
param smtpSecurity string = ''

@description('GRAPH_MAIL_SENDER: mailbox (UPN or id) to send from through Graph sendMail (needs Mail.Send, see infra/grant-graph-permissions.sh). Empty: SMTP.')
param graphMailSender string = ''

// ---------------------------------------------------------------------------------------------
// Parameters: secrets. Each one is stored in Key Vault only when given, and the app setting is a
// Key Vault reference, never the value. A secret put into the vault by hand
// (az keyvault secret set, see docs/deploy.md) is referenced once its setting name is listed in
// secretsInVault.
// ---------------------------------------------------------------------------------------------

@description('TEAMS_WEBHOOK_URL (Teams Workflows "When a Teams webhook request is received" URL). Stored as Key Vault secret teams-webhook-url.')
@secure()
param teamsWebhookUrl string = ''

@description('WEBHOOK_URL (generic JSON webhook). Stored as Key Vault secret webhook-url.')
@secure()
param webhookUrl string = ''

@description('WEBHOOK_SECRET (HMAC-SHA256 key for X-Alerter-Signature). Stored as Key Vault secret webhook-secret.')
@secure()
param webhookSecret string = ''

@description('SMTP_PASSWORD. Stored as Key Vault secret smtp-password.')
@secure()
param smtpPassword string = ''

@description('More plain app settings, e.g. {"SUPPRESSIONS_PATH": "suppressions.yaml"} (see docs/deploy.md). The settings this template manages win over a key given here, so it cannot replace a Key Vault reference or the storage settings. Never put a secret here.')
param extraAppSettings object = {}

@description('Comma list of secret settings whose secret already exists in the vault (set by hand), e.g. "TEAMS_WEBHOOK_URL,WEBHOOK_SECRET": their Key Vault references are set even though no value is passed here.')
param secretsInVault string = ''

// ---------------------------------------------------------------------------------------------
// Parameters: people, monitoring, scale
// ---------------------------------------------------------------------------------------------

@description('Optional object id of the operator (user, group or service principal) who sets secrets and inspects the ledger: gets Key Vault Secrets Officer on the vault and Storage Table Data Contributor on the storage account. azd passes the signed-in user. Empty: no operator access is granted.')
param operatorPrincipalId string = ''

@description('Principal type of operatorPrincipalId.')
@allowed([
  'User'
  'Group'
  'ServicePrincipal'
])
param operatorPrincipalType string = 'User'

@description('Optional e-mail address that receives the two alert rules (a new action group is created).')
param alertEmail string = ''

@description('Optional resource id of an existing action group to notify as well.')
param existingActionGroupId string = ''

@description('Hours without a run before the "no run" alert fires: two schedule periods (8 for the default every-4-hours schedule; change it with ALERT_SCHEDULE).')
@minValue(1)
@maxValue(48)
param missedRunAlertHours int = 8

@description('Optional timer function name (operation_Name) for the "no run" alert. Empty: any function of the app.')
param timerFunctionName string = ''

@description('Storage redundancy for host storage and the ledger.')
@allowed([
  'Standard_LRS'
  'Standard_ZRS'
  'Standard_GRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_LRS'

@description('Flex Consumption maximum instance count (the timer runs on one instance at a time).')
@minValue(40)
@maxValue(1000)
param maximumInstanceCount int = 40

@description('Flex Consumption instance memory in MB.')
@allowed([
  512
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Days a deleted Key Vault (and its secrets) stays recoverable. Purge protection is on: nobody can shorten it.')
@minValue(7)
@maxValue(90)
param keyVaultSoftDeleteRetentionInDays int = 90

// ---------------------------------------------------------------------------------------------
// Names
// ---------------------------------------------------------------------------------------------

var token = toLower(uniqueString(subscription().id, resourceGroup().id, environmentName))
var prefix = toLower(namePrefix)
var functionAppName = 'func-${prefix}-${token}'
var planName = 'plan-${prefix}-${token}'
var storageAccountName = take('st${replace(prefix, '-', '')}${token}', 24)
var keyVaultName = take('kv-${prefix}-${token}', 24)
var logAnalyticsName = 'log-${prefix}-${token}'
var appInsightsName = 'appi-${prefix}-${token}'
var deploymentContainerName = 'app-package-${token}'
var tags = {
  'azd-env-name': environmentName
  application: 'rmm-signer-alerter'
}

// The Sentinel workspace id, split: /subscriptions/{2}/resourceGroups/{4}/providers/Microsoft.OperationalInsights/workspaces/{8}
var workspaceIdParts = split(sentinelWorkspaceResourceId, '/')
var workspaceSubscriptionId = workspaceIdParts[2]
var workspaceResourceGroupName = workspaceIdParts[4]
var workspaceName = workspaceIdParts[8]

// Built-in role definition ids (the same GUID in every tenant).
var storageBlobDataOwnerRoleId = 'b7e6dc6d-f1e8-4753-8033-0f276bb0955b'
var storageTableDataContributorRoleId = '0a9a7e1f-b9d0-4cc4-a60d-0319b160aaa3'
var keyVaultSecretsUserRoleId = '4633458b-17de-408a-b874-0445c86b69e6'
var keyVaultSecretsOfficerRoleId = 'b86a8fe4-44ce-4948-aee5-eccb2c155cd7'

// Secret settings that are referenced from Key Vault (value given now, or already in the vault).
// A reference to a secret that does not exist would reach the app as the literal
// "@Microsoft.KeyVault(...)" text, so a reference is set only when the secret is there.
// (The parentheses around !empty(...) are for pycep, which binds ! looser than ||.)
var vaultSecretList = split(replace(secretsInVault, ' ', ''), ',')
var useTeamsWebhookUrl = (!empty(teamsWebhookUrl)) || contains(vaultSecretList, 'TEAMS_WEBHOOK_URL')
var useWebhookUrl = (!empty(webhookUrl)) || contains(vaultSecretList, 'WEBHOOK_URL')
var useWebhookSecret = (!empty(webhookSecret)) || contains(vaultSecretList, 'WEBHOOK_SECRET')
var useSmtpPassword = (!empty(smtpPassword)) || contains(vaultSecretList, 'SMTP_PASSWORD')

// ---------------------------------------------------------------------------------------------
// The existing Sentinel workspace (read for its customerId, the GUID the query API takes)
// ---------------------------------------------------------------------------------------------

resource sentinelWorkspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
}

// ---------------------------------------------------------------------------------------------
// Storage: host storage, deployment package, ledger table. Entra ID only.
// ---------------------------------------------------------------------------------------------

resource storage 'Microsoft.Storage/storageAccounts@2023-05-01' = {
  name: storageAccountName
  location: location
  tags: tags
  kind: 'StorageV2'
  sku: {
    name: storageSku
  }
  properties: {
    accessTier: 'Hot'
    supportsHttpsTrafficOnly: true
    minimumTlsVersion: 'TLS1_2'
    allowBlobPublicAccess: false
    allowSharedKeyAccess: false
    defaultToOAuthAuthentication: true
    allowCrossTenantReplication: false
    // The Flex Consumption app reaches its storage over the public endpoint (no VNet in this
    // template); every request still needs an Entra ID token and a data role. See docs/deploy.md.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
    encryption: {
      keySource: 'Microsoft.Storage'
      requireInfrastructureEncryption: true
      services: {
        blob: {
          enabled: true
          keyType: 'Account'
        }
        file: {
          enabled: true
          keyType: 'Account'
        }
        table: {
          enabled: true
          keyType: 'Account'
        }
        queue: {
          enabled: true
          keyType: 'Account'
        }
      }
    }
  }
}

resource blobService 'Microsoft.Storage/storageAccounts/blobServices@2023-05-01' = {
  parent: storage
  name: 'default'
  properties: {
    deleteRetentionPolicy: {
      enabled: true
      days: 7
    }
    containerDeleteRetentionPolicy: {
      enabled: true
      days: 7
    }
  }
}

resource deploymentContainer 'Microsoft.Storage/storageAccounts/blobServices/containers@2023-05-01' = {
  parent: blobService
  name: deploymentContainerName
  properties: {
    publicAccess: 'None'
  }
}

resource tableService 'Microsoft.Storage/storageAccounts/tableServices@2023-05-01' = {
  parent: storage
  name: 'default'
}

resource stateTable 'Microsoft.Storage/storageAccounts/tableServices/tables@2023-05-01' = {
  parent: tableService
  name: stateTableName
}

// ---------------------------------------------------------------------------------------------
// Key Vault: RBAC mode, soft delete, purge protection. Secrets only when a value is given.
// ---------------------------------------------------------------------------------------------

resource keyVault 'Microsoft.KeyVault/vaults@2023-07-01' = {
  name: keyVaultName
  location: location
  tags: tags
  properties: {
    tenantId: subscription().tenantId
    sku: {
      family: 'A'
      name: 'standard'
    }
    enableRbacAuthorization: true
    enableSoftDelete: true
    softDeleteRetentionInDays: keyVaultSoftDeleteRetentionInDays
    enablePurgeProtection: true
    enabledForDeployment: false
    enabledForDiskEncryption: false
    enabledForTemplateDeployment: false
    // Key Vault references are resolved by the platform over the public endpoint (no VNet in this
    // template) and operators set secrets from their workstation. See docs/deploy.md.
    publicNetworkAccess: 'Enabled'
    networkAcls: {
      defaultAction: 'Allow'
      bypass: 'AzureServices'
    }
  }
}

resource teamsWebhookUrlSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(teamsWebhookUrl)) {
  parent: keyVault
  name: 'teams-webhook-url'
  properties: {
    value: teamsWebhookUrl
    contentType: 'text/uri-list'
  }
}

resource webhookUrlSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookUrl)) {
  parent: keyVault
  name: 'webhook-url'
  properties: {
    value: webhookUrl
    contentType: 'text/uri-list'
  }
}

resource webhookSecretSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(webhookSecret)) {
  parent: keyVault
  name: 'webhook-secret'
  properties: {
    value: webhookSecret
    contentType: 'text/plain'
  }
}

resource smtpPasswordSecret 'Microsoft.KeyVault/vaults/secrets@2023-07-01' = if (!empty(smtpPassword)) {
  parent: keyVault
  name: 'smtp-password'
  properties: {
    value: smtpPassword
    contentType: 'text/plain'
  }
}

// ---------------------------------------------------------------------------------------------
// Monitoring: Log Analytics + Application Insights + alert rules (module)
// ---------------------------------------------------------------------------------------------

module monitoring 'modules/monitoring.bicep' = {
  name: 'alerter-monitoring'
  params: {
    location: location
    tags: tags
    logAnalyticsName: logAnalyticsName
    appInsightsName: appInsightsName
    functionAppName: functionAppName
    timerFunctionName: timerFunctionName
    missedRunAlertHours: missedRunAlertHours
    alertEmail: alertEmail
    existingActionGroupId: existingActionGroupId
  }
}

// ---------------------------------------------------------------------------------------------
// The Function App: Flex Consumption, Linux, Python 3.11, system-assigned identity
// ---------------------------------------------------------------------------------------------

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    tier: 'FlexConsumption'
    name: 'FC1'
  }
  properties: {
    reserved: true
  }
}

resource functionApp 'Microsoft.Web/sites@2024-04-01' = {
  name: functionAppName
  location: location
  tags: union(tags, {
    'azd-service-name': 'alerter'
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'SystemAssigned'
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    clientAffinityEnabled: false
    keyVaultReferenceIdentity: 'SystemAssigned'
    siteConfig: {
      minTlsVersion: '1.2'
      scmMinTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${storage.properties.primaryEndpoints.blob}${deploymentContainerName}'
          authentication: {
            type: 'SystemAssignedIdentity'
          }
        }
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
    }
  }
  dependsOn: [
    deploymentContainer
  ]
}

// No basic-auth (publishing profile) deployments: azd and az deploy with Entra ID.
resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: functionApp
  name: 'scm'
  properties: {
    allow: false
  }
}

// App settings. The whole set is owned here: this resource replaces the app's settings, so a
// setting added by hand in the portal is gone after the next deployment (use extraAppSettings).
// Optional plain settings are left out when empty, so the app applies its own default;
// secret settings are Key Vault references, present only when the secret exists.
// A separate config resource (not siteConfig.appSettings) so that the settings, and with them the
// first Key Vault reference resolution, come after the identity's role assignments.
var kvSecretsBase = '${keyVault.properties.vaultUri}secrets'

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: functionApp
  name: 'appsettings'
  properties: union(extraAppSettings, {
    AzureWebJobsStorage__accountName: storage.name
    APPLICATIONINSIGHTS_CONNECTION_STRING: monitoring.outputs.appInsightsConnectionString
    ALERT_SCHEDULE: alertSchedule
    QUERY_SOURCE: querySource
    LOG_ANALYTICS_WORKSPACE_ID: sentinelWorkspace.properties.customerId
    LOG_ANALYTICS_WORKSPACE_RESOURCE_ID: sentinelWorkspaceResourceId
    STATE_STORE: 'table'
    STATE_TABLE_ENDPOINT: 'https://${storage.name}.table.${environment().suffixes.storage}'
    STATE_TABLE_NAME: stateTableName
  }, empty(detections) ? {} : {
    DETECTIONS: detections
  }, empty(realertAfter) ? {} : {
    REALERT_AFTER: realertAfter
  }, empty(emailTo) ? {} : {
    EMAIL_TO: emailTo
  }, empty(emailFrom) ? {} : {
    EMAIL_FROM: emailFrom
  }, empty(smtpHost) ? {} : {
    SMTP_HOST: smtpHost
  }, empty(smtpPort) ? {} : {
    SMTP_PORT: smtpPort
  }, empty(smtpUsername) ? {} : {
    SMTP_USERNAME: smtpUsername
  }, empty(smtpSecurity) ? {} : {
    SMTP_SECURITY: smtpSecurity
  }, empty(graphMailSender) ? {} : {
    GRAPH_MAIL_SENDER: graphMailSender
  }, useTeamsWebhookUrl ? {
    TEAMS_WEBHOOK_URL: '@Microsoft.KeyVault(SecretUri=${kvSecretsBase}/teams-webhook-url/)'
  } : {}, useWebhookUrl ? {
    WEBHOOK_URL: '@Microsoft.KeyVault(SecretUri=${kvSecretsBase}/webhook-url/)'
  } : {}, useWebhookSecret ? {
    WEBHOOK_SECRET: '@Microsoft.KeyVault(SecretUri=${kvSecretsBase}/webhook-secret/)'
  } : {}, useSmtpPassword ? {
    SMTP_PASSWORD: '@Microsoft.KeyVault(SecretUri=${kvSecretsBase}/smtp-password/)'
  } : {})
  dependsOn: [
    stateTable
    storageBlobDataOwner
    storageTableDataContributor
    keyVaultSecretsUser
    teamsWebhookUrlSecret
    webhookUrlSecret
    webhookSecretSecret
    smtpPasswordSecret
  ]
}

// ---------------------------------------------------------------------------------------------
// Role assignments for the app's managed identity (least privilege)
// ---------------------------------------------------------------------------------------------

// Host storage (timer schedule status and singleton lease blobs, host keys) and the Flex
// deployment container: the Functions host needs to create containers and manage leases, which
// Storage Blob Data Owner covers. No queue role: a timer-only app uses no queues.
resource storageBlobDataOwner 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, functionApp.id, storageBlobDataOwnerRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageBlobDataOwnerRoleId)
    principalId: functionApp.identity.principalId
    principalType: 'ServicePrincipal'
    description: 'RMM signer alerter: Functions host storage and deployment package.'
  }
}

// The delivery ledger (STATE_TABLE_ENDPOINT / STATE_TABLE_NAME).
resource storageTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(storage.id, functionApp.id, storageTableDataContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributorRoleId)
    principalId: functionApp.identity.principalId
    principalType: 'ServicePrincipal'
    description: 'RMM signer alerter: delivery ledger table.'
  }
}

// Key Vault references for the secret settings.
resource keyVaultSecretsUser 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(keyVault.id, functionApp.id, keyVaultSecretsUserRoleId)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsUserRoleId)
    principalId: functionApp.identity.principalId
    principalType: 'ServicePrincipal'
    description: 'RMM signer alerter: resolve Key Vault references.'
  }
}

// Log Analytics Reader on the Sentinel workspace, in the workspace's own resource group.
// Only for QUERY_SOURCE=log_analytics: the defender source reads through Microsoft Graph instead.
module sentinelWorkspaceReader 'modules/workspace-reader.bicep' = if (querySource == 'log_analytics') {
  name: 'alerter-sentinel-reader-${token}'
  scope: resourceGroup(workspaceSubscriptionId, workspaceResourceGroupName)
  params: {
    workspaceName: workspaceName
    principalId: functionApp.identity.principalId
  }
}

// Optional operator access: set secrets, inspect and repair the ledger (`python -m alerter state`).
resource operatorSecretsOfficer 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(keyVault.id, operatorPrincipalId, keyVaultSecretsOfficerRoleId)
  scope: keyVault
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', keyVaultSecretsOfficerRoleId)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
    description: 'RMM signer alerter operator: set channel secrets.'
  }
}

resource operatorTableDataContributor 'Microsoft.Authorization/roleAssignments@2022-04-01' = if (!empty(operatorPrincipalId)) {
  name: guid(storage.id, operatorPrincipalId, storageTableDataContributorRoleId)
  scope: storage
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', storageTableDataContributorRoleId)
    principalId: operatorPrincipalId
    principalType: operatorPrincipalType
    description: 'RMM signer alerter operator: inspect and repair the delivery ledger.'
  }
}

// ---------------------------------------------------------------------------------------------
// Outputs (azd stores them in the environment; docs/deploy.md uses them)
// ---------------------------------------------------------------------------------------------

output AZURE_LOCATION string = location
output AZURE_FUNCTION_APP_NAME string = functionApp.name
output AZURE_FUNCTION_PRINCIPAL_ID string = functionApp.identity.principalId
output AZURE_STORAGE_ACCOUNT_NAME string = storage.name
output AZURE_KEY_VAULT_NAME string = keyVault.name
output AZURE_KEY_VAULT_URI string = keyVault.properties.vaultUri
output APPLICATIONINSIGHTS_NAME string = monitoring.outputs.appInsightsName
output STATE_TABLE_ENDPOINT string = 'https://${storage.name}.table.${environment().suffixes.storage}'
output STATE_TABLE_NAME string = stateTableName
output LOG_ANALYTICS_WORKSPACE_ID string = sentinelWorkspace.properties.customerId

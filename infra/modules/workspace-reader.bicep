// Grants one principal "Log Analytics Reader" on an EXISTING Log Analytics workspace.
// Deployed by main.bicep with `scope: resourceGroup(<workspace subscription>, <workspace RG>)`,
// because a role assignment must be created in the deployment scope of the resource it targets,
// and the Sentinel workspace usually lives in the SOC's own resource group (or subscription).

targetScope = 'resourceGroup'

@description('Name of the existing Log Analytics (Sentinel) workspace in this resource group.')
param workspaceName string

@description('Object id of the service principal (the Function App managed identity) to grant.')
param principalId string

// Built-in role "Log Analytics Reader": read all monitoring data and run queries.
var logAnalyticsReaderRoleId = '73c42c96-874c-492b-b04d-ab87d138a893'

resource workspace 'Microsoft.OperationalInsights/workspaces@2022-10-01' existing = {
  name: workspaceName
}

resource workspaceReader 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(workspace.id, principalId, logAnalyticsReaderRoleId)
  scope: workspace
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', logAnalyticsReaderRoleId)
    principalId: principalId
    principalType: 'ServicePrincipal'
    description: 'RMM signer alerter: run the Sentinel hunting queries (QUERY_SOURCE=log_analytics).'
  }
}

output roleAssignmentId string = workspaceReader.id

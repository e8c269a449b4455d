// Monitoring for the alerter: a dedicated Log Analytics workspace, workspace-based Application
// Insights, an optional action group and two scheduled-query alert rules:
//   1. a timer run failed (requests with success == false for the Function App);
//   2. no run at all for longer than `missedRunAlertHours` (two schedule periods by default).
// A failed or missing run is the only signal that detections stopped, so both rules matter.

targetScope = 'resourceGroup'

@description('Azure region.')
param location string

@description('Tags for every resource.')
param tags object = {}

@description('Log Analytics workspace name (the alerter\'s own telemetry, not the Sentinel workspace).')
param logAnalyticsName string

@description('Application Insights component name.')
param appInsightsName string

@description('Days to keep the alerter\'s own telemetry.')
@minValue(30)
@maxValue(730)
param retentionInDays int = 30

@description('Function App name: Application Insights reports it as cloud_RoleName.')
param functionAppName string

@description('Optional: the timer function name (operation_Name) to watch for the "no run" rule. Empty: any function of the app counts as a run (the app has one timer function).')
param timerFunctionName string = ''

@description('Hours without any run before the "no run" alert fires: two schedule periods (8 for the default every-4-hours schedule).')
@minValue(1)
@maxValue(48)
param missedRunAlertHours int = 8

@description('Optional e-mail address for a new action group that receives both alerts.')
param alertEmail string = ''

@description('Optional resource id of an existing action group (for example the SOC\'s) to notify as well.')
param existingActionGroupId string = ''

var createActionGroup = !empty(alertEmail)

resource logAnalytics 'Microsoft.OperationalInsights/workspaces@2022-10-01' = {
  name: logAnalyticsName
  location: location
  tags: tags
  properties: {
    sku: {
      name: 'PerGB2018'
    }
    retentionInDays: retentionInDays
    features: {
      enableLogAccessUsingOnlyResourcePermissions: true
    }
  }
}

resource appInsights 'Microsoft.Insights/components@2020-02-02' = {
  name: appInsightsName
  location: location
  tags: tags
  kind: 'web'
  properties: {
    Application_Type: 'web'
    WorkspaceResourceId: logAnalytics.id
    IngestionMode: 'LogAnalytics'
    publicNetworkAccessForIngestion: 'Enabled'
    publicNetworkAccessForQuery: 'Enabled'
  }
}

resource actionGroup 'Microsoft.Insights/actionGroups@2023-01-01' = if (createActionGroup) {
  name: 'ag-${functionAppName}'
  location: 'Global'
  tags: tags
  properties: {
    groupShortName: 'rmmalerter'
    enabled: true
    emailReceivers: [
      {
        name: 'alerter-operators'
        emailAddress: alertEmail
        useCommonAlertSchema: true
      }
    ]
  }
}

var newActionGroupIds = createActionGroup ? [
  actionGroup.id
] : []
var existingActionGroupIds = empty(existingActionGroupId) ? [] : [
  existingActionGroupId
]
var actionGroupIds = concat(newActionGroupIds, existingActionGroupIds)

var timerFilter = empty(timerFunctionName) ? '' : '\n| where operation_Name =~ \'${timerFunctionName}\''

var failedRunQuery = 'requests\n| where cloud_RoleName =~ \'${functionAppName}\'\n| where success == false\n| project timestamp, operation_Name, resultCode, duration, operation_Id'

var missedRunQuery = 'requests\n| where cloud_RoleName =~ \'${functionAppName}\'${timerFilter}\n| project timestamp, operation_Name, success'

resource failedRunAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${functionAppName}-run-failed'
  location: location
  tags: tags
  properties: {
    displayName: 'RMM signer alerter: a timer run failed (${functionAppName})'
    description: 'A run of the alerter ended with an error: a query, a delivery or the settings failed. Nothing is lost (pending deliveries are retried next run), but detections may have stopped. Check traces and exceptions for the operation_Id.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    // The window overlaps two evaluations so a late-ingested failure is still seen; the rule is
    // stateful (autoMitigate), so one failure notifies once and resolves when runs succeed again.
    evaluationFrequency: 'PT15M'
    windowSize: 'PT30M'
    criteria: {
      allOf: [
        {
          query: failedRunQuery
          timeAggregation: 'Count'
          operator: 'GreaterThan'
          threshold: 0
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

resource missedRunAlert 'Microsoft.Insights/scheduledQueryRules@2023-12-01' = {
  name: 'alert-${functionAppName}-no-run'
  location: location
  tags: tags
  properties: {
    displayName: 'RMM signer alerter: no run for ${missedRunAlertHours}h (${functionAppName})'
    description: 'The alerter timer has not run for more than two schedule periods: the app is stopped, cannot start (settings, Key Vault reference, package) or its host storage is unreachable. Detections are not running.'
    severity: 1
    enabled: true
    scopes: [
      appInsights.id
    ]
    evaluationFrequency: 'PT1H'
    windowSize: 'PT${missedRunAlertHours}H'
    criteria: {
      allOf: [
        {
          query: missedRunQuery
          timeAggregation: 'Count'
          operator: 'LessThan'
          threshold: 1
          failingPeriods: {
            numberOfEvaluationPeriods: 1
            minFailingPeriodsToAlert: 1
          }
        }
      ]
    }
    autoMitigate: true
    actions: {
      actionGroups: actionGroupIds
    }
  }
}

output logAnalyticsWorkspaceId string = logAnalytics.id
output appInsightsId string = appInsights.id
output appInsightsName string = appInsights.name
output appInsightsConnectionString string = appInsights.properties.ConnectionString
output failedRunAlertId string = failedRunAlert.id
output missedRunAlertId string = missedRunAlert.id

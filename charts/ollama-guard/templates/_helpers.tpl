{{/*
Expand the name of the chart.
*/}}
{{- define "ollama-guard.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "ollama-guard.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "ollama-guard.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "ollama-guard.labels" -}}
helm.sh/chart: {{ include "ollama-guard.chart" . }}
{{ include "ollama-guard.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: ollama-guard
{{- end }}

{{/*
Selector labels
*/}}
{{- define "ollama-guard.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ollama-guard.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
The operator's names and labels.
*/}}
{{- define "ollama-guard.operatorName" -}}
{{- printf "%s-operator" (include "ollama-guard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ollama-guard.operatorLabels" -}}
{{ include "ollama-guard.labels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "ollama-guard.operatorSelectorLabels" -}}
{{ include "ollama-guard.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "ollama-guard.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "ollama-guard.operatorName" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The GuardProxy created from values, and the URL of its Service.
*/}}
{{- define "ollama-guard.guardProxyName" -}}
{{- default (include "ollama-guard.fullname" .) .Values.guardProxy.name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ollama-guard.guardProxyURL" -}}
{{- $port := 8080 }}
{{- with .Values.guardProxy.spec.service }}{{ with .port }}{{ $port = . }}{{ end }}{{ end }}
{{- printf "http://%s.%s.svc:%v" (include "ollama-guard.guardProxyName" .) .Release.Namespace $port }}
{{- end }}

{{- define "ollama-guard.operatorImage" -}}
{{- printf "%s:%s" .Values.operator.image.repository (default .Chart.AppVersion .Values.operator.image.tag) }}
{{- end }}

{{/*
API-key auth of the chart's GuardProxy: the generated key's Secret, and the Secret (and its key) holding the
keys file the GuardProxy's spec.auth.apiKeysSecret names.
*/}}
{{- define "ollama-guard.apiKeySecretName" -}}
{{- printf "%s-api-key" (include "ollama-guard.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "ollama-guard.apiKeysSecretName" -}}
{{- default (printf "%s-api-keys" (include "ollama-guard.fullname" .) | trunc 63 | trimSuffix "-") .Values.guardProxy.auth.existingSecret }}
{{- end }}

{{- define "ollama-guard.apiKeysSecretKey" -}}
{{- default "keys.yaml" .Values.guardProxy.auth.key }}
{{- end }}

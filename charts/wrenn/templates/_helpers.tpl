{{/* Names and labels shared by every template. */}}

{{- define "wrenn.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wrenn.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "wrenn.operator.fullname" -}}
{{- printf "%s-operator" (include "wrenn.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wrenn.agent.fullname" -}}
{{- printf "%s-node-agent" (include "wrenn.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels of objects that also carry selector labels (which hold the instance). */}}
{{- define "wrenn.commonLabels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
app.kubernetes.io/part-of: wrenn
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end -}}

{{- define "wrenn.labels" -}}
{{ include "wrenn.commonLabels" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The operator finds agents by this label (WRENN_AGENT_SELECTOR): it is fixed, not derived from the release. */}}
{{- define "wrenn.agent.selectorLabels" -}}
app.kubernetes.io/name: wrenn-node-agent
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wrenn.operator.selectorLabels" -}}
app.kubernetes.io/name: wrenn-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wrenn.operator.serviceAccountName" -}}
{{- if .Values.operator.serviceAccount.create -}}
{{- default (include "wrenn.operator.fullname" .) .Values.operator.serviceAccount.name -}}
{{- else -}}
{{- .Values.operator.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "wrenn.agent.serviceAccountName" -}}
{{- if .Values.nodeAgent.serviceAccount.create -}}
{{- default (include "wrenn.agent.fullname" .) .Values.nodeAgent.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.nodeAgent.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* image reference: registry/repository@digest or :tag (tag defaults to appVersion). Args: (dict "root" $ "image" .Values.x.image) */}}
{{- define "wrenn.image" -}}
{{- $repo := .image.repository -}}
{{- with .root.Values.image.registry -}}{{- $repo = printf "%s/%s" (trimSuffix "/" .) $repo -}}{{- end -}}
{{- if .image.digest -}}
{{- printf "%s@%s" $repo .image.digest -}}
{{- else -}}
{{- printf "%s:%s" $repo (default .root.Chart.AppVersion .image.tag) -}}
{{- end -}}
{{- end -}}

{{/* Secret names holding each side's key pair and the CA it trusts. */}}
{{- define "wrenn.agent.tlsSecret" -}}{{ include "wrenn.agent.fullname" . }}-tls{{- end -}}
{{- define "wrenn.operator.tlsSecret" -}}{{ include "wrenn.operator.fullname" . }}-tls{{- end -}}

{{/*
Where each side's trust anchor lives. helm mode: ca.crt of its own Secret holds
the *other* side's CA. cert-manager mode: ca.crt of a leaf Secret is the CA that
issued that leaf, so each side reads the other side's CA Secret instead.
*/}}
{{- define "wrenn.agent.trustSecret" -}}
{{- if eq .Values.tls.mode "cert-manager" -}}{{ include "wrenn.fullname" . }}-client-ca{{- else -}}{{ include "wrenn.agent.tlsSecret" . }}{{- end -}}
{{- end -}}
{{- define "wrenn.operator.trustSecret" -}}
{{- if eq .Values.tls.mode "cert-manager" -}}{{ include "wrenn.fullname" . }}-agent-ca{{- else -}}{{ include "wrenn.operator.tlsSecret" . }}{{- end -}}
{{- end -}}

{{- define "wrenn.gateway.fullname" -}}
{{- printf "%s-gateway" (include "wrenn.fullname" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "wrenn.gateway.selectorLabels" -}}
app.kubernetes.io/name: wrenn-gateway
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wrenn.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "wrenn.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The gateway's Secrets: its client key pair towards agents (ca.crt: the agent CA), and its serving key pair (ca.crt: the CA the APIService trusts). */}}
{{- define "wrenn.gateway.tlsSecret" -}}{{ include "wrenn.gateway.fullname" . }}-tls{{- end -}}
{{- define "wrenn.gateway.servingSecret" -}}{{ include "wrenn.gateway.fullname" . }}-serving{{- end -}}

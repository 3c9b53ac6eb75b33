{{/*
Mutual-TLS material in helm mode, as YAML with base64 values:
  agentCrt, agentKey     node agent's server certificate, signed by the agent CA
  operatorCrt, operatorKey  operator's client certificate, signed by the client CA
  agentCA, clientCA      the two CA certificates
Two CAs, so that a node's agent key can never pass as the operator to another
node: agents trust only the client CA, the operator trusts only the agent CA.
The CA keys are used once, at generation, and stored nowhere.

Reused from the Secrets in the cluster when both are complete (so upgrades keep
them and running agents keep trusting the operator); generated afresh, both at
once, when either is missing. Computed once per render and memoised in .Values,
so the Secrets and the pods' checksum annotations agree.
*/}}
{{- define "wrenn.tls.material" -}}
{{- if not (hasKey .Values "_wrennTls") -}}
{{- $ns := .Release.Namespace -}}
{{- $agent := lookup "v1" "Secret" $ns (include "wrenn.agent.tlsSecret" .) -}}
{{- $op := lookup "v1" "Secret" $ns (include "wrenn.operator.tlsSecret" .) -}}
{{- $ad := ($agent | default dict).data | default dict -}}
{{- $od := ($op | default dict).data | default dict -}}
{{- $m := dict -}}
{{- if and (index $ad "tls.crt") (index $ad "tls.key") (index $ad "ca.crt") (index $od "tls.crt") (index $od "tls.key") (index $od "ca.crt") -}}
{{- $m = dict "agentCrt" (index $ad "tls.crt") "agentKey" (index $ad "tls.key") "clientCA" (index $ad "ca.crt") "operatorCrt" (index $od "tls.crt") "operatorKey" (index $od "tls.key") "agentCA" (index $od "ca.crt") "reused" true -}}
{{- else -}}
{{- $days := int .Values.tls.validityDays -}}
{{- $agentCA := genCA "wrenn-node-agent-ca" $days -}}
{{- $clientCA := genCA "wrenn-operator-client-ca" $days -}}
{{- $sans := list .Values.tls.agentServerName (printf "%s.%s.svc" (include "wrenn.agent.fullname" .) $ns) -}}
{{- $agentCert := genSignedCert .Values.tls.agentServerName nil $sans $days $agentCA -}}
{{- $opCert := genSignedCert "wrenn-operator" nil nil $days $clientCA -}}
{{- $m = dict "agentCrt" ($agentCert.Cert | b64enc) "agentKey" ($agentCert.Key | b64enc) "clientCA" ($clientCA.Cert | b64enc) "operatorCrt" ($opCert.Cert | b64enc) "operatorKey" ($opCert.Key | b64enc) "agentCA" ($agentCA.Cert | b64enc) "reused" false -}}
{{- end -}}
{{- $_ := set .Values "_wrennTls" $m -}}
{{- end -}}
{{- toYaml (get .Values "_wrennTls") -}}
{{- end -}}

{{/* Pod annotation that changes exactly when the certificates change, so pods pick up new ones. */}}
{{- define "wrenn.tls.checksum" -}}
{{- if eq .Values.tls.mode "helm" -}}
{{- $m := include "wrenn.tls.material" . | fromYaml -}}
checksum/tls: {{ printf "%s%s" $m.agentCrt $m.operatorCrt | sha256sum | trunc 16 | quote }}
{{- end -}}
{{- end -}}

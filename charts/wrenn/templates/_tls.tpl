{{/*
Mutual-TLS material in helm mode, as YAML with base64 values:
  agentCrt, agentKey     node agent's server certificate, signed by the agent CA
  operatorCrt, operatorKey  operator's client certificate, signed by the client CA
  agentCA, clientCA      the two CA certificates
  gatewayCrt, gatewayKey    (gateway.enabled) the gateway's client certificate, signed by the client CA
  servingCrt, servingKey, servingCA  (gateway.enabled) the gateway's serving certificate and its
                         own CA, which only the APIService's caBundle trusts
Two CAs, so that a node's agent key can never pass as the operator to another
node: agents trust only the client CA, the operator only the agent CA.

Each CA comes from values (tls.agentCA / tls.clientCA, PEM cert and key) when
given, so it is the same in every render; otherwise it is generated, used once
and its key stored nowhere.

Reused from the Secrets in the cluster when both are complete and their CAs are
the ones values give (so upgrades keep them and running agents keep trusting
the operator); issued afresh, both at once, otherwise. `lookup` finds nothing
under `helm template` and most GitOps tools: there each render issues new leaf
certificates, which is harmless only when both CAs come from values (the
components reload rotated files). Computed once per render and memoised in
.Values, so the Secrets and the pods' checksum annotations agree.
*/}}
{{- define "wrenn.tls.material" -}}
{{- if not (hasKey .Values "_wrennTls") -}}
{{- $ns := .Release.Namespace -}}
{{- $tls := .Values.tls -}}
{{- $given := dict "agent" ($tls.agentCA | default dict) "client" ($tls.clientCA | default dict) -}}
{{- range $which, $ca := $given -}}
{{- if or (and $ca.cert (not $ca.key)) (and $ca.key (not $ca.cert)) -}}
{{- fail (printf "tls.%sCA needs both cert and key (PEM), or neither" $which) -}}
{{- end -}}
{{- end -}}
{{- $agentGiven := $given.agent.cert | default "" -}}
{{- $clientGiven := $given.client.cert | default "" -}}
{{- $agent := lookup "v1" "Secret" $ns (include "wrenn.agent.tlsSecret" .) -}}
{{- $op := lookup "v1" "Secret" $ns (include "wrenn.operator.tlsSecret" .) -}}
{{- $ad := ($agent | default dict).data | default dict -}}
{{- $od := ($op | default dict).data | default dict -}}
{{- $gwOn := .Values.gateway.enabled -}}
{{- $gw := lookup "v1" "Secret" $ns (include "wrenn.gateway.tlsSecret" .) -}}
{{- $gs := lookup "v1" "Secret" $ns (include "wrenn.gateway.servingSecret" .) -}}
{{- $gd := ($gw | default dict).data | default dict -}}
{{- $sd := ($gs | default dict).data | default dict -}}
{{- $gwComplete := or (not $gwOn) (and (index $gd "tls.crt") (index $gd "tls.key") (index $sd "tls.crt") (index $sd "tls.key") (index $sd "ca.crt")) -}}
{{- $complete := and (index $ad "tls.crt") (index $ad "tls.key") (index $ad "ca.crt") (index $od "tls.crt") (index $od "tls.key") (index $od "ca.crt") $gwComplete -}}
{{- $sameCAs := and (or (not $agentGiven) (eq (index $od "ca.crt" | default "") (b64enc $agentGiven))) (or (not $clientGiven) (eq (index $ad "ca.crt" | default "") (b64enc $clientGiven))) -}}
{{- $m := dict -}}
{{- if and $complete $sameCAs -}}
{{- $m = dict "agentCrt" (index $ad "tls.crt") "agentKey" (index $ad "tls.key") "clientCA" (index $ad "ca.crt") "operatorCrt" (index $od "tls.crt") "operatorKey" (index $od "tls.key") "agentCA" (index $od "ca.crt") "reused" true -}}
{{- if $gwOn -}}
{{- $_ := set $m "gatewayCrt" (index $gd "tls.crt") -}}
{{- $_ := set $m "gatewayKey" (index $gd "tls.key") -}}
{{- $_ := set $m "servingCrt" (index $sd "tls.crt") -}}
{{- $_ := set $m "servingKey" (index $sd "tls.key") -}}
{{- $_ := set $m "servingCA" (index $sd "ca.crt") -}}
{{- end -}}
{{- else -}}
{{- $days := int $tls.validityDays -}}
{{- $agentCA := "" -}}
{{- if $agentGiven -}}
{{- $agentCA = buildCustomCert (b64enc $agentGiven) (b64enc $given.agent.key) -}}
{{- else -}}
{{- $agentCA = genCA "wrenn-node-agent-ca" $days -}}
{{- end -}}
{{- $clientCA := "" -}}
{{- if $clientGiven -}}
{{- $clientCA = buildCustomCert (b64enc $clientGiven) (b64enc $given.client.key) -}}
{{- else -}}
{{- $clientCA = genCA "wrenn-operator-client-ca" $days -}}
{{- end -}}
{{- $sans := list $tls.agentServerName (printf "%s.%s.svc" (include "wrenn.agent.fullname" .) $ns) -}}
{{- $agentCert := genSignedCert $tls.agentServerName nil $sans $days $agentCA -}}
{{- $opCert := genSignedCert $tls.operatorClientName nil (list $tls.operatorClientName) $days $clientCA -}}
{{- $m = dict "agentCrt" ($agentCert.Cert | b64enc) "agentKey" ($agentCert.Key | b64enc) "clientCA" ($clientCA.Cert | b64enc) "operatorCrt" ($opCert.Cert | b64enc) "operatorKey" ($opCert.Key | b64enc) "agentCA" ($agentCA.Cert | b64enc) "reused" false -}}
{{- if $gwOn -}}
{{/* The gateway: a client certificate from the client CA (agents serve its
name), and a serving certificate from a CA of its own that only the
APIService trusts. */}}
{{- $gwCert := genSignedCert $tls.gatewayClientName nil (list $tls.gatewayClientName) $days $clientCA -}}
{{- $svc := printf "%s.%s.svc" (include "wrenn.gateway.fullname" .) $ns -}}
{{- $servingCA := genCA "wrenn-gateway-serving-ca" $days -}}
{{- $serving := genSignedCert $svc nil (list $svc (printf "%s.cluster.local" $svc)) $days $servingCA -}}
{{- $_ := set $m "gatewayCrt" ($gwCert.Cert | b64enc) -}}
{{- $_ := set $m "gatewayKey" ($gwCert.Key | b64enc) -}}
{{- $_ := set $m "servingCrt" ($serving.Cert | b64enc) -}}
{{- $_ := set $m "servingKey" ($serving.Key | b64enc) -}}
{{- $_ := set $m "servingCA" ($servingCA.Cert | b64enc) -}}
{{- end -}}
{{- end -}}
{{- $_ := set .Values "_wrennTls" $m -}}
{{- end -}}
{{- toYaml (get .Values "_wrennTls") -}}
{{- end -}}

{{/* Client certificate names agents serve: the operator's, then any extra (a gateway's). */}}
{{- define "wrenn.tls.clientNames" -}}
{{- $names := .Values.tls.extraClientNames | default list -}}
{{- if .Values.gateway.enabled -}}{{- $names = prepend $names .Values.tls.gatewayClientName -}}{{- end -}}
{{- prepend $names .Values.tls.operatorClientName | uniq | join "," -}}
{{- end -}}

{{/*
Pod annotation that changes exactly when a CA changes, so both sides restart
onto the new trust together. Leaf certificates are not in it: agents and the
operator reload rotated leaves from their mounted Secrets without a restart, so
a render that re-issues leaves under the same CAs restarts nothing.
*/}}
{{- define "wrenn.tls.checksum" -}}
{{- if eq .Values.tls.mode "helm" -}}
{{- $m := include "wrenn.tls.material" . | fromYaml -}}
checksum/tls: {{ printf "%s%s" $m.agentCA $m.clientCA | sha256sum | trunc 16 | quote }}
{{- end -}}
{{- end -}}

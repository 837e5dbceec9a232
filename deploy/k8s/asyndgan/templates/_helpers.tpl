{{/* Names ------------------------------------------------------------------------------------------------- */}}
{{- define "asyndgan.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "asyndgan.fullname" -}}
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

{{- define "asyndgan.role" -}}
{{- if not (has .Values.role (list "generator" "discriminator")) }}
{{- fail (printf "role must be generator or discriminator, not %q" (toString .Values.role)) }}
{{- end }}
{{- .Values.role }}
{{- end }}

{{- define "asyndgan.isGenerator" -}}
{{- if eq (include "asyndgan.role" .) "generator" }}true{{ end }}
{{- end }}

{{/* "true" for a dial-out discriminator: it opens no gRPC port and connects to discriminator.generatorAddress. */}}
{{- define "asyndgan.dialOut" -}}
{{- if not (include "asyndgan.isGenerator" .) }}
{{- $d := .Values.discriminator }}
{{- $mode := $d.mode | default "dial-in" }}
{{- if eq $mode "dial-out" }}
{{- if not $d.generatorAddress }}
{{- fail "discriminator.mode=dial-out needs discriminator.generatorAddress (the generator's HOST:PORT)" }}
{{- end }}
{{- if not (regexMatch "^.+:[0-9]+$" $d.generatorAddress) }}
{{- fail (printf "discriminator.generatorAddress %q is not HOST:PORT" $d.generatorAddress) }}
{{- end }}
{{- if ne .Values.service.type "ClusterIP" }}
{{- fail (printf "discriminator.mode=dial-out opens no port: service.type %s would expose nothing but metrics (keep ClusterIP)" .Values.service.type) }}
{{- end }}
true
{{- else if ne $mode "dial-in" }}
{{- fail (printf "discriminator.mode must be dial-in or dial-out, not %q" $mode) }}
{{- else if $d.generatorAddress }}
{{- fail "discriminator.generatorAddress is set but discriminator.mode is dial-in: set mode: dial-out (or drop the address)" }}
{{- end }}
{{- end }}
{{- end }}

{{/* The generator's port as seen by a dial-out pod's egress rule: networkPolicy.egressPort or generatorAddress's. */}}
{{- define "asyndgan.egressPort" -}}
{{- $np := .Values.discriminator.networkPolicy }}
{{- if $np.egressPort }}{{ $np.egressPort }}
{{- else }}{{ regexFind "[0-9]+$" .Values.discriminator.generatorAddress }}{{ end }}
{{- end }}

{{- define "asyndgan.selectorLabels" -}}
app.kubernetes.io/name: {{ include "asyndgan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: {{ include "asyndgan.role" . }}
{{- end }}

{{- define "asyndgan.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "asyndgan.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: asyndgan
{{- if not (include "asyndgan.isGenerator" .) }}
asyndgan.io/site: {{ required "discriminator.siteId is required for role=discriminator" .Values.discriminator.siteId | quote }}
{{- end }}
{{- end }}

{{- define "asyndgan.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "asyndgan.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* Ports, image, TLS ------------------------------------------------------------------------------------ */}}
{{- define "asyndgan.grpcPort" -}}
{{- if .Values.service.port }}{{ .Values.service.port }}{{ else if include "asyndgan.isGenerator" . }}50051{{ else }}50061{{ end }}
{{- end }}

{{- define "asyndgan.image" -}}
{{- $repo := default (printf "asyndgan-%s" (include "asyndgan.role" .)) .Values.image.repository }}
{{- printf "%s:%s" $repo (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "asyndgan.tlsDir" -}}/etc/asyndgan/tls{{- end }}

{{/* The name in the certificate this service presents: the generator dials each site by its site id; the
     generator's own certificate is "generator" by the project's convention (asyndgan certs issue generator). */}}
{{- define "asyndgan.tlsServerName" -}}
{{- if .Values.tls.serverName }}{{ .Values.tls.serverName }}
{{- else if include "asyndgan.isGenerator" . }}generator
{{- else }}{{ .Values.discriminator.siteId }}{{ end }}
{{- end }}

{{/* The TLS Secret(s) as the pod volume "tls" (mounted at asyndgan.tlsDir): tls.crt, tls.key and ca.crt. */}}
{{- define "asyndgan.tlsVolume" -}}
- name: tls
  projected:
    defaultMode: 0440
    sources:
      - secret:
          name: {{ .Values.tls.secretName }}
          items:
            - {key: tls.crt, path: tls.crt}
            - {key: tls.key, path: tls.key}
            {{- if not .Values.tls.caSecretName }}
            - {key: ca.crt, path: ca.crt}
            {{- end }}
      {{- with .Values.tls.caSecretName }}
      - secret:
          name: {{ . }}
          items:
            - {key: ca.crt, path: ca.crt}
      {{- end }}
{{- end }}

{{/* The `helm test` Pod's selector labels (its own component: no Service or NetworkPolicy of the release selects
     it as the workload; the discriminator's NetworkPolicy admits it by these labels). */}}
{{- define "asyndgan.testSelectorLabels" -}}
app.kubernetes.io/name: {{ include "asyndgan.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: helm-test
{{- end }}

{{- define "asyndgan.tlsArgs" -}}
{{- if .Values.tls.enabled }}
- --tls-cert={{ include "asyndgan.tlsDir" . }}/tls.crt
- --tls-key={{ include "asyndgan.tlsDir" . }}/tls.key
- --tls-ca={{ include "asyndgan.tlsDir" . }}/ca.crt
{{- end }}
{{- end }}

{{/* Probes: kubelet's native grpc probe is plaintext only; with mutual TLS use the in-image exec check.
     Dial-out: nothing listens on a gRPC port; an HTTP GET of /metrics when metrics are on, else no probes ("none"). */}}
{{- define "asyndgan.probeMode" -}}
{{- $mode := .Values.probes.mode | default "auto" }}
{{- if include "asyndgan.dialOut" . }}
{{- if ne $mode "auto" }}
{{- fail (printf "probes.mode=%s with discriminator.mode=dial-out: nothing listens on a gRPC port (use auto: HTTP /metrics, or none without metrics)" $mode) }}
{{- end }}
{{- if .Values.metrics.enabled }}http{{ else }}none{{ end }}
{{- else if eq $mode "auto" }}{{ if .Values.tls.enabled }}exec{{ else }}grpc{{ end }}
{{- else if and (eq $mode "grpc") .Values.tls.enabled }}
{{- fail "probes.mode=grpc with tls.enabled: the kubelet's grpc probe speaks plaintext only (use auto, exec or tcp)" }}
{{- else if has $mode (list "grpc" "exec" "tcp") }}{{ $mode }}
{{- else }}{{ fail (printf "probes.mode must be auto, grpc, exec or tcp, not %q" $mode) }}{{ end }}
{{- end }}

{{- define "asyndgan.probeAction" -}}
{{- $mode := include "asyndgan.probeMode" . }}
{{- $port := include "asyndgan.grpcPort" . | int }}
{{- if eq $mode "http" }}
httpGet:
  path: /metrics
  port: metrics
{{- else if eq $mode "grpc" }}
grpc:
  port: {{ $port }}
{{- else if eq $mode "exec" }}
exec:
  command:
    - /opt/asyndgan/bin/asyndgan-health
    - --address=127.0.0.1:{{ $port }}
    - --timeout={{ .Values.probes.execTimeoutSeconds }}
    {{- if .Values.tls.enabled }}
    - --server-name={{ include "asyndgan.tlsServerName" . }}
    {{- include "asyndgan.tlsArgs" . | trim | nindent 4 }}
    {{- end }}
{{- else }}
tcpSocket:
  port: grpc
{{- end }}
{{- end }}

{{/* Names, labels and the TOML renderer shared by every template. */}}

{{- define "comfyq.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "comfyq.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* selector labels of one component: (dict "root" $ "component" "ingress") */}}
{{- define "comfyq.selector" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "comfyq.image" -}}
{{- $root := .root -}}
{{- printf "%s/%s:%s" $root.Values.image.registry .image.repository (default $root.Chart.AppVersion (default $root.Values.image.tag .image.tag)) -}}
{{- end -}}

{{/* The NATS client URL(s) the services use. */}}
{{- define "comfyq.natsUrl" -}}
{{- if .Values.natsConnection.url -}}
{{- .Values.natsConnection.url -}}
{{- else if .Values.nats.enabled -}}
{{- printf "nats://%s-nats.%s.svc:4222" .Release.Name .Release.Namespace -}}
{{- else -}}
{{- fail "natsConnection.url is required when nats.enabled is false" -}}
{{- end -}}
{{- end -}}

{{/* Stream name of a suffix under the configured prefix (shared/src/names.rs:
     upper case, '-' as '_'). (dict "root" $ "suffix" "PENDING") */}}
{{- define "comfyq.stream" -}}
{{- printf "%s_%s" (upper (replace "-" "_" .root.Values.natsConnection.config.prefix)) .suffix -}}
{{- end -}}

{{/*
TOML from a map. Helm reads every number in values as a float64, which its
toToml writes as `3.0`; comfyq's integer settings refuse that, so this writes
integral numbers as integers. Keys are always quoted.
(dict "map" $m "path" (list))
*/}}
{{- define "comfyq.toml" -}}
{{- $path := .path -}}
{{- range $k, $v := .map -}}
{{- if not (or (kindIs "map" $v) (include "comfyq.toml.isTableArray" $v)) }}
{{ toJson $k }} = {{ include "comfyq.toml.value" $v }}
{{- end -}}
{{- end -}}
{{- range $k, $v := .map -}}
{{- $sub := append $path (toJson $k) -}}
{{- if kindIs "map" $v }}

[{{ join "." $sub }}]
{{- include "comfyq.toml" (dict "map" $v "path" $sub) -}}
{{- else if include "comfyq.toml.isTableArray" $v -}}
{{- range $item := $v }}

[[{{ join "." $sub }}]]
{{- include "comfyq.toml" (dict "map" $item "path" $sub) -}}
{{- end -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "comfyq.toml.isTableArray" -}}
{{- if and (kindIs "slice" .) (gt (len .) 0) (kindIs "map" (first .)) -}}true{{- end -}}
{{- end -}}

{{- define "comfyq.toml.value" -}}
{{- if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{- if $i }}, {{ end -}}{{- include "comfyq.toml.value" $e -}}{{- end -}}]
{{- else if or (kindIs "float64" .) (kindIs "int" .) (kindIs "int64" .) -}}
{{- if eq (float64 .) (floor .) -}}{{ int64 . }}{{- else -}}{{ . }}{{- end -}}
{{- else if kindIs "bool" . -}}
{{ . }}
{{- else if kindIs "invalid" . -}}
{{- fail "comfyq config: null values have no TOML form (remove the key)" -}}
{{- else -}}
{{ toJson (toString .) }}
{{- end -}}
{{- end -}}

{{/* An inline TOML value (maps as { k = v }), for COMFYQ_* variables. */}}
{{- define "comfyq.toml.inline" -}}
{{- if kindIs "map" . -}}
{ {{- $first := true -}}{{- range $k, $v := . -}}{{- if not $first }}, {{ end -}}{{- $first = false -}}{{ toJson $k }} = {{ include "comfyq.toml.inline" $v }}{{- end -}} }
{{- else if kindIs "slice" . -}}
[{{- range $i, $e := . -}}{{- if $i }}, {{ end -}}{{- include "comfyq.toml.inline" $e -}}{{- end -}}]
{{- else -}}
{{- include "comfyq.toml.value" . -}}
{{- end -}}
{{- end -}}

{{/* Volumes and env every service gets for NATS credentials and TLS.
     (dict "root" $ "key" "ingress") */}}
{{- define "comfyq.natsEnv" -}}
- name: COMFYQ_NATS__URL
  value: {{ include "comfyq.natsUrl" .root | quote }}
{{- if .root.Values.natsConnection.credentials.existingSecret }}
- name: COMFYQ_NATS__CREDENTIALS_FILE
  value: /etc/comfyq/nats/nats.creds
{{- end }}
{{- end -}}

{{- define "comfyq.natsVolumeMounts" -}}
{{- if .root.Values.natsConnection.credentials.existingSecret }}
- name: nats-creds
  mountPath: /etc/comfyq/nats
  readOnly: true
{{- end }}
{{- if .root.Values.natsConnection.tls.existingSecret }}
- name: nats-tls
  mountPath: /etc/comfyq/nats-tls
  readOnly: true
{{- end }}
{{- end -}}

{{- define "comfyq.natsVolumes" -}}
{{- with .root.Values.natsConnection.credentials.existingSecret }}
- name: nats-creds
  secret:
    secretName: {{ . }}
    items:
      - key: {{ index $.root.Values.natsConnection.credentials.keys $.key }}
        path: nats.creds
{{- end }}
{{- with .root.Values.natsConnection.tls.existingSecret }}
- name: nats-tls
  secret:
    secretName: {{ . }}
{{- end }}
{{- end -}}

{{/* Extra env from a map: value strings or {valueFrom: ...}. */}}
{{- define "comfyq.extraEnv" -}}
{{- range $name, $value := . }}
- name: {{ $name }}
{{- if kindIs "map" $value }}
  {{- toYaml $value | nindent 2 }}
{{- else }}
  value: {{ $value | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

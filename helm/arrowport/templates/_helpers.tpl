{{/*
Names. Resources are prefixed with the release name; the contract with the operator fixes:
  - ingester StatefulSet and Service: <release>-ingester (extra ingesters: <release>-ingester-<name>)
  - streams ConfigMap: <ingester name>-streams, where the main ingester's name defaults to the release name
  - label arrowport.dev/ingester: <ingester name> on the StatefulSet, its pods and the streams ConfigMap
*/}}

{{- define "arrowport.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "arrowport.operatorName" -}}
{{- printf "%s-operator" .Release.Name | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "arrowport.operatorServiceAccountName" -}}
{{- if .Values.operator.serviceAccount.create }}
{{- default (include "arrowport.operatorName" .) .Values.operator.serviceAccount.name }}
{{- else }}
{{- required "operator.serviceAccount.name is required when operator.serviceAccount.create is false" .Values.operator.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "arrowport.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s:%s@%s" .Values.image.repository $tag .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{/* Labels every resource carries. */}}
{{- define "arrowport.labels" -}}
helm.sh/chart: {{ include "arrowport.chart" . }}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ default .Chart.AppVersion .Values.image.tag | trunc 63 | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: arrowport
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Labels of one component's pods: the selector labels plus part-of, without the chart or app version,
so that a chart upgrade that changes nothing in a pod does not restart it (the ingester is a single
writer: a restart is a short ingest outage). Call with (dict "root" $ "component" "...").
*/}}
{{- define "arrowport.podLabels" -}}
{{ include "arrowport.selectorLabels" . }}
app.kubernetes.io/part-of: arrowport
{{- with .root.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* Selector labels of one component ("operator" or "ingester"). Call with (dict "root" $ "component" "..."). */}}
{{- define "arrowport.selectorLabels" -}}
app.kubernetes.io/name: {{ .root.Chart.Name }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/*
The list of ingesters: the main one from .Values.ingester, then each of .Values.extraIngesters merged
over it. Each entry gets computed keys: ingesterName (label value, streams ConfigMap prefix) and
resourceName (StatefulSet, Service, config ConfigMap). Returns YAML: {"ingesters": [...]}.
*/}}
{{- define "arrowport.ingesters" -}}
{{- $main := deepCopy .Values.ingester }}
{{- $mainName := default .Release.Name $main.name }}
{{- $_ := set $main "ingesterName" $mainName }}
{{- $_ := set $main "resourceName" (printf "%s-ingester" .Release.Name) }}
{{- $list := list $main }}
{{- $seen := dict $mainName true }}
{{- range $i, $extra := .Values.extraIngesters }}
{{- $name := required (printf "extraIngesters[%d].name is required" $i) $extra.name }}
{{- if hasKey $seen $name }}
{{- fail (printf "extraIngesters[%d].name %q is already used by another ingester of this release" $i $name) }}
{{- end }}
{{- $_ := set $seen $name true }}
{{- $merged := mustMergeOverwrite (deepCopy $.Values.ingester) (deepCopy $extra) }}
{{- /* Lists replace rather than merge: take them from the entry when it has them. */}}
{{- range $key, $value := $extra }}
{{- if kindIs "slice" $value }}
{{- $_ := set $merged $key $value }}
{{- end }}
{{- end }}
{{- /* Static streams belong to one ingester: an extra ingester has only its own. */}}
{{- $_ := set $merged.config "streams" (default (dict) (dig "config" "streams" (dict) $extra)) }}
{{- $_ := set $merged "ingesterName" $name }}
{{- $_ := set $merged "resourceName" (printf "%s-ingester-%s" $.Release.Name $name) }}
{{- $list = append $list $merged }}
{{- end }}
{{- range $list }}
{{- if gt (len .resourceName) 52 }}
{{- fail (printf "ingester resource name %q is longer than 52 characters (StatefulSet pod labels need room for a hash): use a shorter release or ingester name" .resourceName) }}
{{- end }}
{{- $shutdown := int (default 30 (dig "limits" "shutdown_timeout_seconds" 30 .config)) }}
{{- if le (int .terminationGracePeriodSeconds) $shutdown }}
{{- fail (printf "ingester %q: terminationGracePeriodSeconds (%d) must exceed config.limits.shutdown_timeout_seconds (%d), or Kubernetes kills the pod before it rolls back its open uploads and checkpoints" .ingesterName (int .terminationGracePeriodSeconds) $shutdown) }}
{{- end }}
{{- if gt (len (printf "%s-streams" .ingesterName)) 63 }}
{{- fail (printf "ingester name %q is too long: %s-streams must fit in 63 characters" .ingesterName .ingesterName) }}
{{- end }}
{{- end }}
{{- toYaml (dict "ingesters" $list) }}
{{- end }}

{{/* The ingester's config.yaml. Call with one entry of arrowport.ingesters. */}}
{{- define "arrowport.ingesterConfig" -}}
{{- $config := deepCopy .config }}
{{- $_ := set $config "db_path" "/var/lib/arrowport/arrowport.duckdb" }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "port" (int .port) }}
{{- $_ := set $config "streams_path" "/etc/arrowport/streams/streams.yaml" }}
{{- /* A level applies only to zstd (the ingester rejects it otherwise), and null means "no level". */}}
{{- if or (ne $config.compression.algorithm "zstd") (kindIs "invalid" $config.compression.level) }}
{{- $_ := unset $config.compression "level" }}
{{- end }}
{{- range $key, $value := $config.limits }}
{{- if kindIs "float64" $value }}
{{- $_ := set $config.limits $key (int64 $value) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* One ServiceMonitor endpoint's settings from .Values.serviceMonitor. */}}
{{- define "arrowport.serviceMonitorEndpoint" -}}
path: /metrics
scheme: http
interval: {{ .interval }}
scrapeTimeout: {{ .scrapeTimeout }}
{{- with .relabelings }}
relabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .metricRelabelings }}
metricRelabelings:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

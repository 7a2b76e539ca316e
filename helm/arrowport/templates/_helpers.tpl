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

{{/*
One of the three images (image/files in the repository names them), `<registry>/<name>:<tag>[@<digest>]`.
Call with (dict "root" $ "image" "ingester"|"lake"|"operator").
*/}}
{{- define "arrowport.image" -}}
{{- $image := get .root.Values.image .image }}
{{- $tag := default .root.Chart.AppVersion .root.Values.image.tag }}
{{- $ref := printf "%s:%s" $image.name $tag }}
{{- with .root.Values.image.registry }}
{{- $ref = printf "%s/%s" . $ref }}
{{- end }}
{{- with $image.digest }}
{{- $ref = printf "%s@%s" $ref . }}
{{- end }}
{{- $ref }}
{{- end }}

{{/* An ingester's image: arrowport for a DuckDB file, arrowport-lake (the extensions) for a DuckLake.
Call with (dict "root" $ "ing" <entry of arrowport.ingesters>). */}}
{{- define "arrowport.ingesterImage" -}}
{{- include "arrowport.image" (dict "root" .root "image" (ternary "lake" "ingester" (eq .ing.storage.kind "ducklake"))) }}
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
{{- $lakes := dict }}
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
{{- include "arrowport.checkStorage" (dict "ing" . "lakes" $lakes) }}
{{- end }}
{{- toYaml (dict "ingesters" $list) }}
{{- end }}

{{/*
Where the pods find things: the image's DuckDB extensions (Dockerfile), the per-pod volume, and the
mount of ingester.storage.sharedDataClaim.
*/}}
{{- define "arrowport.extensionDirectory" -}}/usr/local/lib/arrowport/extensions{{- end }}
{{- define "arrowport.volumePath" -}}/var/lib/arrowport{{- end }}
{{- define "arrowport.sharedPath" -}}/lake{{- end }}

{{/*
Checks one ingester's storage values (after extraIngesters are merged) and sets its computed key "lake"
(for kind ducklake; empty otherwise): {catalog, dataPath, postgres, sharedDataClaim}. The values schema checks replicas
for `ingester` alone; this is the second guard, and the only one for extraIngesters. "lakes" collects
PostgreSQL catalogs across the release (catalog -> "claim|dataPath"), since ingesters writing one lake
must share its data path. Call with (dict "ing" <entry> "lakes" <dict>).
*/}}
{{- define "arrowport.checkStorage" -}}
{{- $ing := .ing }}
{{- $st := $ing.storage }}
{{- $replicas := int $ing.replicas }}
{{- $volume := include "arrowport.volumePath" . }}
{{- $sharedPath := include "arrowport.sharedPath" . }}
{{- if ne $st.kind "ducklake" }}
{{- if gt $replicas 1 }}
{{- fail (printf "ingester %q: replicas is %d, but storage.kind %q allows 1 at most (one process writes a DuckDB file). More than one replica needs storage.kind ducklake with a PostgreSQL catalog (storage.catalog: postgres:...) and storage.sharedDataClaim; or scale out with extraIngesters, one database each" $ing.ingesterName $replicas $st.kind) }}
{{- end }}
{{- range $key := list "catalog" "dataPath" "sharedDataClaim" }}
{{- if get $st $key }}
{{- fail (printf "ingester %q: storage.%s is set, but it applies to storage.kind ducklake only (storage.kind is %q)" $ing.ingesterName $key $st.kind) }}
{{- end }}
{{- end }}
{{- if $st.postgresPasswordSecret.name }}
{{- fail (printf "ingester %q: storage.postgresPasswordSecret is set, but it applies to a DuckLake with a PostgreSQL catalog only (storage.kind is %q)" $ing.ingesterName $st.kind) }}
{{- end }}
{{- /* Empty, so that .lake.<key> is safe where `and` does not short-circuit (Go before 1.18). */}}
{{- $_ := set $ing "lake" (dict) }}
{{- else }}
{{- $postgres := hasPrefix "postgres:" $st.catalog }}
{{- $shared := $st.sharedDataClaim }}
{{- $catalog := default (printf "%s/lake/meta.ducklake" $volume) $st.catalog }}
{{- $dataPath := $st.dataPath }}
{{- if not $dataPath }}
{{- $dataPath = ternary (printf "%s/data" $sharedPath) (printf "%s/lake/data" $volume) (ne $shared "") }}
{{- end }}
{{- /* Paths must lie on a volume the pod writes: its own, or the shared claim's. */}}
{{- $roots := list (printf "%s/" $volume) }}
{{- if $shared }}
{{- $roots = append $roots (printf "%s/" $sharedPath) }}
{{- end }}
{{- $paths := dict "dataPath" $dataPath }}
{{- if not $postgres }}
{{- $_ := set $paths "catalog" $catalog }}
{{- end }}
{{- range $key, $path := $paths }}
{{- $onVolume := false }}
{{- range $roots }}
{{- if and (hasPrefix . $path) (gt (len $path) (len .)) }}
{{- $onVolume = true }}
{{- end }}
{{- end }}
{{- if or (not $onVolume) (contains "/../" (printf "%s/" $path)) (contains "/./" (printf "%s/" $path)) }}
{{- fail (printf "ingester %q: storage.%s %q must be a path under %s (the pod's root filesystem is read-only, and nothing else lasts)" $ing.ingesterName $key $path (join " or " $roots)) }}
{{- end }}
{{- end }}
{{- if $postgres }}
{{- if regexMatch "(^|[ :])password[ ]*=" $st.catalog }}
{{- fail (printf "ingester %q: storage.catalog holds a password; the config file is a ConfigMap: put the password into a Secret and name it in storage.postgresPasswordSecret (the ingester gets it as PGPASSWORD)" $ing.ingesterName) }}
{{- end }}
{{- $lakeKey := printf "%s|%s" $shared $dataPath }}
{{- with get $.lakes $st.catalog }}
{{- if or (ne . $lakeKey) (not $shared) }}
{{- fail (printf "ingester %q writes the PostgreSQL catalog %q that another ingester of this release writes too: ingesters of one lake must share its data, with the same storage.sharedDataClaim (set) and storage.dataPath" $ing.ingesterName $st.catalog) }}
{{- end }}
{{- end }}
{{- $_ := set $.lakes $st.catalog $lakeKey }}
{{- if and (gt $replicas 1) (not $shared) }}
{{- fail (printf "ingester %q: replicas is %d, which needs storage.sharedDataClaim, a ReadWriteMany PersistentVolumeClaim for the lake's data: every replica reads the Parquet files the others write, so the data path must be shared storage mounted at the same path in every pod" $ing.ingesterName $replicas) }}
{{- end }}
{{- else }}
{{- if gt $replicas 1 }}
{{- fail (printf "ingester %q: replicas is %d, but a DuckLake with a local catalog file (%s) allows 1 at most (one process writes the file). More than one replica needs a PostgreSQL catalog (storage.catalog: postgres:...) and storage.sharedDataClaim" $ing.ingesterName $replicas $catalog) }}
{{- end }}
{{- if $st.postgresPasswordSecret.name }}
{{- fail (printf "ingester %q: storage.postgresPasswordSecret is set, but storage.catalog is not a PostgreSQL catalog (postgres:...)" $ing.ingesterName) }}
{{- end }}
{{- end }}
{{- $_ := set $ing "lake" (dict "catalog" $catalog "dataPath" $dataPath "postgres" $postgres "sharedDataClaim" $shared) }}
{{- end }}
{{- end }}

{{/* The ingester's config.yaml. Call with one entry of arrowport.ingesters. */}}
{{- define "arrowport.ingesterConfig" -}}
{{- $config := deepCopy .config }}
{{- with .lake }}
{{- $_ := set $config "storage" (dict
      "kind" "ducklake"
      "catalog" .catalog
      "data_path" .dataPath
      "data_inlining_row_limit" (int64 $.storage.dataInliningRowLimit)
      "maintenance_interval_seconds" (int64 $.storage.maintenanceIntervalSeconds)
      "snapshot_retention_seconds" (int64 $.storage.snapshotRetentionSeconds)) }}
{{- $_ := set $config "duckdb" (dict "extension_directory" (include "arrowport.extensionDirectory" $)) }}
{{- else }}
{{- $_ := set $config "db_path" (printf "%s/arrowport.duckdb" (include "arrowport.volumePath" $)) }}
{{- end }}
{{- $_ := set $config "host" "0.0.0.0" }}
{{- $_ := set $config "port" (int .port) }}
{{- $_ := set $config "streams_path" "/etc/arrowport/streams/streams.yaml" }}
{{- if .auth.tokensSecret }}
{{- $_ := set $config "auth" (dict "tokens_file" (printf "/etc/arrowport/auth/%s" .auth.tokensKey)) }}
{{- end }}
{{- if .tls.secretName }}
{{- $tls := dict "cert" "/etc/arrowport/tls/tls.crt" "key" "/etc/arrowport/tls/tls.key" }}
{{- if .tls.clientAuth }}
{{- $_ := set $tls "client_ca" "/etc/arrowport/tls/ca.crt" }}
{{- end }}
{{- $_ := set $config "tls" $tls }}
{{- end }}
{{- /* A level applies only to zstd (the ingester rejects it otherwise), and null means "no level". */}}
{{- if or (ne $config.compression.algorithm "zstd") (kindIs "invalid" $config.compression.level) }}
{{- $_ := unset $config.compression "level" }}
{{- end }}
{{- with $config.journal }}
{{- $_ := set . "path" (printf "%s/journal" (include "arrowport.volumePath" $)) }}
{{- if kindIs "float64" .linger_ms }}
{{- $_ := set . "linger_ms" (int64 .linger_ms) }}
{{- end }}
{{- end }}
{{- range $key, $value := $config.limits }}
{{- if kindIs "float64" $value }}
{{- $_ := set $config.limits $key (int64 $value) }}
{{- end }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* One ServiceMonitor endpoint's settings from .Values.serviceMonitor; .scheme and .scrapeTls (a
TLSConfig) for ingesters with TLS on. */}}
{{- define "arrowport.serviceMonitorEndpoint" -}}
path: /metrics
scheme: {{ .scheme | default "http" }}
{{- with .scrapeTls }}
tlsConfig:
  {{- toYaml . | nindent 2 }}
{{- end }}
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

{{/* A probe's handler: GET .path over .scheme, or a TCP check when .tcp (mutual TLS). */}}
{{- define "arrowport.probeHandler" -}}
{{- if .tcp -}}
tcpSocket:
  port: http
{{- else -}}
httpGet:
  path: {{ .path }}
  port: http
  scheme: {{ .scheme }}
{{- end }}
{{- end }}

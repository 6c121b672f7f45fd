{{/*
diffdisagg.name: the chart name, or .Values.nameOverride. Usage: {{ include "diffdisagg.name" . }}
*/}}
{{- define "diffdisagg.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
diffdisagg.fullname: "<release>-<name>" (just the release name when it already contains the chart name),
or .Values.fullnameOverride; the prefix of every object's name. Usage: {{ include "diffdisagg.fullname" . }}
*/}}
{{- define "diffdisagg.fullname" -}}
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
diffdisagg.selectorLabels: the immutable labels the Deployment selects its pod by.
Usage: {{- include "diffdisagg.selectorLabels" . | nindent 6 }}
*/}}
{{- define "diffdisagg.selectorLabels" -}}
app.kubernetes.io/name: {{ include "diffdisagg.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{/*
diffdisagg.labels: selector labels plus version and chart labels, on every object of the chart.
Usage: {{- include "diffdisagg.labels" . | nindent 4 }}
*/}}
{{- define "diffdisagg.labels" -}}
{{ include "diffdisagg.selectorLabels" . }}
app.kubernetes.io/part-of: diffdisagg
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
diffdisagg.serviceAccountName: the ServiceAccount the operator runs as.
Usage: {{ include "diffdisagg.serviceAccountName" . }}
*/}}
{{- define "diffdisagg.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "diffdisagg.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
diffdisagg.image: "<repository>:<tag>", the tag defaulting to the chart's appVersion.
Usage: {{ include "diffdisagg.image" . }}
*/}}
{{- define "diffdisagg.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/*
diffdisagg.durationMs: a duration of the values' form ("5s", "1m30s", "500ms") in milliseconds; the schema
has already checked the form. Usage: {{ include "diffdisagg.durationMs" "1m30s" | int }}
*/}}
{{- define "diffdisagg.durationMs" -}}
{{- $ms := 0 }}
{{- $unit := dict "ms" 1 "s" 1000 "m" 60000 "h" 3600000 }}
{{- range regexFindAll "[0-9]+(ms|s|m|h)" . -1 }}
{{- $n := regexFind "^[0-9]+" . }}
{{- $ms = add $ms (mul (atoi $n) (get $unit (trimPrefix $n .))) }}
{{- end }}
{{- $ms }}
{{- end }}

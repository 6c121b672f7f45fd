{{/*
diffdisagg-crds.labels: the labels every object of this chart carries.
Usage: {{ include "diffdisagg-crds.labels" . }}
*/}}
{{- define "diffdisagg-crds.labels" -}}
app.kubernetes.io/name: diffdisagg
app.kubernetes.io/component: crds
app.kubernetes.io/part-of: diffdisagg
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end }}

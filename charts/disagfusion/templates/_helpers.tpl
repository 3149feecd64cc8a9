{{/* Chart name, truncated to the 63 characters of a DNS label. */}}
{{- define "disagfusion.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-<chart> unless the release name already holds the chart name. */}}
{{- define "disagfusion.fullname" -}}
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

{{- define "disagfusion.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels. Deliberately without app.kubernetes.io/part-of: disagfusion, which
marks the pipeline pods (gateway and workers) that the PodMonitor scrapes.
*/}}
{{- define "disagfusion.labels" -}}
helm.sh/chart: {{ include "disagfusion.chart" . }}
{{ include "disagfusion.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "disagfusion.selectorLabels" -}}
app.kubernetes.io/name: {{ include "disagfusion.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "disagfusion.operatorSelectorLabels" -}}
{{ include "disagfusion.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "disagfusion.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "disagfusion.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
"repository:tag" of an image value (dict "image" <image value> "appVersion" <default tag>).
The tag may be a number: --set image.tag=1 gives an int64 and `tag: 2000000` in a values
file a float64, which Go prints as 2e+06, so an integral float64 is printed as an integer.
A missing or empty tag is the appVersion.
*/}}
{{- define "disagfusion.imageRef" -}}
{{- $tag := .image.tag -}}
{{- if kindIs "invalid" $tag }}{{ $tag = "" }}{{ end -}}
{{- if and (kindIs "float64" $tag) (eq $tag (float64 (int64 $tag))) }}{{ $tag = int64 $tag }}{{ end -}}
{{- printf "%s:%s" .image.repository (default .appVersion (toString $tag)) }}
{{- end }}

{{- define "disagfusion.image" -}}
{{- include "disagfusion.imageRef" (dict "image" .Values.image "appVersion" .Chart.AppVersion) }}
{{- end }}

{{- define "disagfusion.workerImage" -}}
{{- include "disagfusion.imageRef" (dict "image" .Values.workerImage "appVersion" .Chart.AppVersion) }}
{{- end }}

{{/* Lower-case DNS-1123 name for a dashboard file: "Stage Overview.json" -> "stage-overview". */}}
{{- define "disagfusion.dashboardName" -}}
{{- $stem := base . | trimSuffix ".json" | lower }}
{{- regexReplaceAll "[^a-z0-9-]+" $stem "-" | trimAll "-" }}
{{- end }}

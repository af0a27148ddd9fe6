{{/* The name of the namespaced objects: the release name, or <release>-trio-spirecsi. */}}
{{- define "trio-spirecsi.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "trio-spirecsi.selectorLabels" -}}
app.kubernetes.io/name: trio-spirecsi
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "trio-spirecsi.labels" -}}
{{ include "trio-spirecsi.selectorLabels" . }}
app.kubernetes.io/part-of: trio-spirecsi
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{/* The folder of the agent's admin socket (mounted at the same path in the driver). */}}
{{- define "trio-spirecsi.adminSocketDir" -}}
{{- dir .Values.spire.adminSocket -}}
{{- end -}}

{{/* The driver's SPIFFE ID path, as the SPIRE chart's authorizedDelegates accepts it. */}}
{{- define "trio-spirecsi.delegatePath" -}}
/ns/{{ .Release.Namespace }}/sa/{{ .Values.serviceAccount.name }}
{{- end -}}

{{/* Names: the release's, unless it already says xdplb. */}}
{{- define "xdplb.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "xdplb.operatorName" -}}{{ include "xdplb.fullname" . }}-operator{{- end -}}
{{- define "xdplb.agentName" -}}{{ include "xdplb.fullname" . }}-agent{{- end -}}
{{- define "xdplb.uninstallName" -}}{{ include "xdplb.fullname" . }}-uninstall{{- end -}}

{{- define "xdplb.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "xdplb.labels" -}}
app.kubernetes.io/name: xdplb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version }}
{{- end -}}

{{- define "xdplb.operatorSelector" -}}
app.kubernetes.io/name: xdplb
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{/*
The agents run in the release namespace (the operator owns their DaemonSet, and an
owner reference cannot cross namespaces) with host networking, a hostPath and
added capabilities: Pod Security "privileged". Refuse early, rather than leave a
DaemonSet whose pods are never admitted.
*/}}
{{- define "xdplb.checkNamespace" -}}
{{- $ns := lookup "v1" "Namespace" "" .Release.Namespace -}}
{{- if $ns -}}
{{- $level := index ($ns.metadata.labels | default dict) "pod-security.kubernetes.io/enforce" | default "" -}}
{{- if and $level (ne $level "privileged") -}}
{{- fail (printf "namespace %s enforces Pod Security %q; the xdplb agents need \"privileged\": kubectl label namespace %s pod-security.kubernetes.io/enforce=privileged --overwrite" .Release.Namespace $level .Release.Namespace) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* A label map as the operator's k=v,... flag. */}}
{{- define "xdplb.selectorText" -}}
{{- $pairs := list -}}
{{- range $k, $v := . -}}{{- $pairs = append $pairs (printf "%s=%s" $k $v) -}}{{- end -}}
{{- join "," $pairs -}}
{{- end -}}

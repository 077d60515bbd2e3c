{{/*
The labels of every object: those the kustomize base gives each (app.kubernetes.io/name
and part-of), then commonLabels. Helm's own labels are left out on purpose, so that the
default rendering equals the base object for object.
*/}}
{{- define "dynvol.labels" -}}
app.kubernetes.io/name: dynvol
app.kubernetes.io/part-of: dynvol
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/* The labels of one component's objects: the common ones and its component. */}}
{{- define "dynvol.componentLabels" -}}
app.kubernetes.io/component: {{ .component }}
{{ include "dynvol.labels" .root }}
{{- end }}

{{/* The dynvol image reference. */}}
{{- define "dynvol.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The image the node plugin gives the Dynamic Mount Pods. */}}
{{/* Global flags of every dynvol process (before its subcommand). */}}
{{- define "dynvol.globalArgs" -}}
{{- with .Values.logging.level }}
- --log-level={{ . }}
{{- end }}
{{- with .Values.logging.format }}
- --log-format={{ . }}
{{- end }}
{{- end }}

{{/* The ServiceAccount user name of a dynvol component, as admission sees it. */}}
{{- define "dynvol.serviceAccountUser" -}}
system:serviceaccount:{{ .root.Release.Namespace }}:{{ .name }}
{{- end }}

{{/* --metrics-address of a component (.component: node or controller). */}}
{{- define "dynvol.metricsAddress" -}}
{{- $m := index .root.Values.metrics .component -}}
--metrics-address={{ if $m.onPodIP }}$(POD_IP){{ else }}0.0.0.0{{ end }}:{{ $m.port }}
{{- end }}

{{/* The POD_IP variable, when a component's metrics listen on it. */}}
{{- define "dynvol.podIPEnv" -}}
{{- $m := index .root.Values.metrics .component -}}
{{- if and .root.Values.metrics.enabled $m.onPodIP }}
- name: POD_IP
  valueFrom:
    fieldRef:
      fieldPath: status.podIP
{{- end }}
{{- end }}

{{/* Common names and labels of the istio-cni chart. */}}

{{- define "istio-cni.name" -}}
istio-cni-node
{{- end }}

{{/* The service account; also the identity the ValidatingAdmissionPolicy restricts. */}}
{{- define "istio-cni.serviceAccountName" -}}
istio-cni
{{- end }}

{{- define "istio-cni.labels" -}}
app.kubernetes.io/name: istio-cni
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "istio-cni.selectorLabels" -}}
k8s-app: istio-cni-node
{{- end }}

{{- define "istio-cni.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{/* The ValidatingAdmissionPolicy is rendered when enabled, the taint (the only node
writes) is on, and the cluster serves the API (offline rendering assumes a recent
Kubernetes). */}}
{{- define "istio-cni.vapEnabled" -}}
{{- if and .Values.validatingAdmissionPolicy.enabled .Values.taint.enabled (or (.Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/ValidatingAdmissionPolicy") (semverCompare ">=1.30.0-0" .Capabilities.KubeVersion.Version)) -}}
true
{{- end }}
{{- end }}

{{/* The container paths of the netns dirs: each host dir under /host. */}}
{{- define "istio-cni.netnsMounts" -}}
{{- $dirs := list }}
{{- range .Values.repair.netnsDirs }}
{{- $dirs = append $dirs (printf "/host%s" .) }}
{{- end }}
{{- join "," $dirs }}
{{- end }}

{{/* CEL: the field at path (e.g. "metadata.labels") is the same in object and oldObject,
absent in both counting as the same. */}}
{{- define "istio-cni.celUnchanged" -}}
(has(object.{{ . }}) == has(oldObject.{{ . }}) && (!has(object.{{ . }}) || object.{{ . }} == oldObject.{{ . }}))
{{- end }}

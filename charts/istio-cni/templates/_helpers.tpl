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

{{/* The image reference. Upstream's way when image is a string or a hub is set:
HUB/IMAGE:TAG[-VARIANT] (an image string with "/" is the whole reference; IMAGE defaults
to istio-cni-node-agent, TAG to tag, global.tag, image.tag, then the appVersion). Else ours:
image.repository:image.tag (default appVersion). */}}
{{- define "istio-cni.image" -}}
{{- $v := .Values }}
{{- $hub := $v.hub | default $v.global.hub }}
{{- $name := "istio-cni-node-agent" }}
{{- if kindIs "string" $v.image }}{{ $name = $v.image | default $name }}{{ end }}
{{- if contains "/" $name }}
{{- $name }}
{{- else if or $hub (kindIs "string" $v.image) }}
{{- $imageTag := "" }}
{{- if kindIs "map" $v.image }}{{ $imageTag = $v.image.tag }}{{ end }}
{{- $tag := $v.tag | default $v.global.tag | default $imageTag | default .Chart.AppVersion }}
{{- with ($v.variant | default $v.global.variant) }}{{ $tag = printf "%s-%s" $tag . }}{{ end }}
{{- printf "%s/%s:%s" ($hub | default "docker.io/istio-cni") $name $tag }}
{{- else }}
{{- printf "%s:%s" $v.image.repository ($v.image.tag | default .Chart.AppVersion) }}
{{- end }}
{{- end }}

{{/* The pull policy: upstream's pullPolicy, then global.imagePullPolicy, then
image.pullPolicy. */}}
{{- define "istio-cni.pullPolicy" -}}
{{- $v := .Values }}
{{- $ours := "" }}
{{- if kindIs "map" $v.image }}{{ $ours = $v.image.pullPolicy }}{{ end }}
{{- $v.pullPolicy | default $v.global.imagePullPolicy | default $ours | default "IfNotPresent" }}
{{- end }}

{{/* Whether namespaced (.ns) or cluster-scoped objects are rendered:
global.resourceScope all, namespace or cluster. */}}
{{- define "istio-cni.namespaced" -}}
{{- if has .Values.global.resourceScope (list "all" "namespace") }}true{{ end }}
{{- end }}
{{- define "istio-cni.clusterScoped" -}}
{{- if has .Values.global.resourceScope (list "all" "cluster") }}true{{ end }}
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

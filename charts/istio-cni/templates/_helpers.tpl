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

{{/* CEL: the DaemonSet's pods can run on the node `object` (a Node at CREATE): its
nodeSelector, then the required node affinity (terms ORed, expressions ANDed; In, NotIn,
Exists, DoesNotExist). Empty when the affinity uses what this cannot express (Gt, Lt,
matchFields): the policy is then not rendered, since a node it taints but the DaemonSet
never reaches would stay tainted. */}}
{{- define "istio-cni.celDaemonSetSelects" -}}
{{- $terms := list }}
{{- $labels := "(has(object.metadata.labels) ? object.metadata.labels : {})" }}
{{- range $k, $v := .Values.nodeSelector }}
{{- $terms = append $terms (printf "(%s in %s && %s[%s] == %s)" (squote $k) $labels $labels (squote $k) (squote $v)) }}
{{- end }}
{{- $ok := true }}
{{- with ((.Values.affinity).nodeAffinity).requiredDuringSchedulingIgnoredDuringExecution }}
{{- $ors := list }}
{{- range .nodeSelectorTerms }}
{{- if .matchFields }}{{ $ok = false }}{{ end }}
{{- $ands := list "true" }}
{{- range .matchExpressions }}
{{- $key := squote .key }}
{{- $vals := list }}{{ range .values }}{{ $vals = append $vals (squote .) }}{{ end }}
{{- $list := printf "[%s]" (join ", " $vals) }}
{{- if eq .operator "In" }}{{ $ands = append $ands (printf "(%s in %s && %s[%s] in %s)" $key $labels $labels $key $list) }}
{{- else if eq .operator "NotIn" }}{{ $ands = append $ands (printf "(!(%s in %s) || !(%s[%s] in %s))" $key $labels $labels $key $list) }}
{{- else if eq .operator "Exists" }}{{ $ands = append $ands (printf "(%s in %s)" $key $labels) }}
{{- else if eq .operator "DoesNotExist" }}{{ $ands = append $ands (printf "!(%s in %s)" $key $labels) }}
{{- else }}{{ $ok = false }}
{{- end }}
{{- end }}
{{- $ors = append $ors (printf "(%s)" (join " && " $ands)) }}
{{- end }}
{{- $terms = append $terms (printf "(%s)" (join " || " $ors)) }}
{{- end }}
{{- if $ok }}
{{- join " && " (prepend $terms "true") }}
{{- end }}
{{- end }}

{{/* The MutatingAdmissionPolicy that taints new nodes: mutatingAdmissionPolicy.enabled
true, or auto where the cluster serves admissionregistration.k8s.io/v1
MutatingAdmissionPolicy (Kubernetes 1.36+); only with the taint on, and only when the
DaemonSet's node selection can be written in CEL. */}}
{{- define "istio-cni.mapEnabled" -}}
{{- $on := .Values.mutatingAdmissionPolicy.enabled }}
{{- $served := .Capabilities.APIVersions.Has "admissionregistration.k8s.io/v1/MutatingAdmissionPolicy" }}
{{- if and .Values.taint.enabled (include "istio-cni.celDaemonSetSelects" .) (or (eq (toString $on) "true") (and (eq (toString $on) "auto") $served)) -}}
true
{{- end }}
{{- end }}

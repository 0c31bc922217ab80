{{/* The chart name, truncated to the 63 characters a label value allows. */}}
{{- define "kubeflash.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The prefix of every object name: the release name, plus the chart name unless the release name has it. */}}
{{- define "kubeflash.fullname" -}}
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

{{- define "kubeflash.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubeflash.labels" -}}
helm.sh/chart: {{ include "kubeflash.chart" . }}
app.kubernetes.io/name: {{ include "kubeflash.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubeflash
{{- end }}

{{/* Selector labels of one component: (dict "ctx" $ "component" "operator"). */}}
{{- define "kubeflash.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubeflash.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* Labels of one component's objects: (dict "ctx" $ "component" "agent"). */}}
{{- define "kubeflash.componentLabels" -}}
{{ include "kubeflash.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* An image reference from {repository, tag, digest}: repository@digest when a digest is set, else
repository:tag (the tag defaults to the chart's appVersion). */}}
{{- define "kubeflash.image" -}}
{{- if .image.digest }}
{{- printf "%s@%s" .image.repository .image.digest }}
{{- else }}
{{- printf "%s:%s" .image.repository (default .ctx.Chart.AppVersion .image.tag) }}
{{- end }}
{{- end }}

{{/* The image of the inference pods: engine.image, else the agent image (it carries the engine). */}}
{{- define "kubeflash.engineImage" -}}
{{- default (include "kubeflash.image" (dict "image" .Values.agent.image "ctx" .)) .Values.engine.image }}
{{- end }}

{{- define "kubeflash.operator.fullname" -}}
{{- printf "%s-operator" (include "kubeflash.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubeflash.agent.fullname" -}}
{{- printf "%s-agent" (include "kubeflash.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The agent's store disks: agent.storePath, then agent.extraDisks (each is mounted at its own path). */}}
{{/* Names and paths must be unique (the agent refuses its config otherwise, and a DaemonSet mounts each path
once): refused here, naming the value, rather than by agents in CrashLoopBackOff. */}}
{{- define "kubeflash.agent.disks" -}}
{{- $disks := list (dict "name" .Values.agent.storeName "path" .Values.agent.storePath) }}
{{- $names := dict .Values.agent.storeName "agent.storeName" }}
{{- $paths := dict (trimSuffix "/" .Values.agent.storePath) "agent.storePath" }}
{{- range $i, $d := .Values.agent.extraDisks }}
{{- $at := printf "agent.extraDisks[%d]" $i }}
{{- if hasKey $names $d.name }}
{{- fail (printf "%s.name %q is already the name of %s: each store disk needs its own name" $at $d.name (get $names $d.name)) }}
{{- end }}
{{- $path := trimSuffix "/" $d.path }}
{{- if hasKey $paths $path }}
{{- fail (printf "%s.path %q is already the path of %s: each store disk needs its own directory" $at $d.path (get $paths $path)) }}
{{- end }}
{{- $_ := set $names $d.name $at }}
{{- $_ := set $paths $path $at }}
{{- $disks = append $disks $d }}
{{- end }}
{{- toYaml $disks }}
{{- end }}

{{/* The agent's config file (docs/agent.md): the store disks, then the keys of agent.config. */}}
{{- define "kubeflash.agent.config" -}}
{{- $disks := include "kubeflash.agent.disks" . | fromYamlArray }}
{{- toYaml (merge (dict "disks" $disks) (deepCopy .Values.agent.config)) }}
{{- end }}

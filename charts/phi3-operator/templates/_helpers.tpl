{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "phi3-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: the release name, prefixed with the chart name unless it already holds it. */}}
{{- define "phi3-operator.fullname" -}}
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

{{/* Cluster-scoped objects (ClusterRole, ClusterRoleBinding) carry the release namespace, so
two releases of the same name in different namespaces do not collide. */}}
{{- define "phi3-operator.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "phi3-operator.fullname" .) | trunc 253 | trimSuffix "-" }}
{{- end }}

{{- define "phi3-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "phi3-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "phi3-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "phi3-operator.labels" -}}
helm.sh/chart: {{ include "phi3-operator.chart" . }}
{{ include "phi3-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: phi3-operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "phi3-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "phi3-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "phi3-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when the operator watches a fixed set of namespaces rather than the whole cluster. */}}
{{- define "phi3-operator.namespaced" -}}
{{- if or (eq .Values.rbac.scope "namespace") (gt (len .Values.watchNamespaces) 0) }}true{{ end }}
{{- end }}

{{/* The namespaces watched in namespaced mode, as a JSON list (use with fromJsonArray). */}}
{{- define "phi3-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else }}
{{- list .Release.Namespace | toJson }}
{{- end }}
{{- end }}

{{/* Namespaced RBAC rules: exactly what the operator calls (operator/phi3_operator/k8s.py,
reconcile.py, handlers.py) plus what kopf needs for the watched resource. */}}
{{- define "phi3-operator.namespacedRules" -}}
# The watched resource: kopf lists and watches it (event handlers only, so it writes no
# annotations or finalizers); reconcile reads it by name and writes its status.
- apiGroups: ["phi3.ai"]
  resources: ["phi3models"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["phi3.ai"]
  resources: ["phi3models/status"]
  verbs: ["get", "patch"]
# Children: server-side apply (PATCH) after a GET; an apply that creates an object needs create.
# kopf watches Deployments for rollout progress. Delete: a model that Knative Serving comes to serve
# (autoscaling on requests) drops its Deployment and Service once its Revision is available, and back.
# Otherwise children go with their owner references through the garbage collector.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
# Elastic serving: a Knative Configuration per model, and its newest Revision's status.
- apiGroups: ["serving.knative.dev"]
  resources: ["configurations"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["serving.knative.dev"]
  resources: ["revisions"]
  verbs: ["get"]
# A model whose pods do not become ready: their status says why (OOMKilled, fetch failed, image pull).
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list"]
# Optional children, deleted when the spec stops asking for them.
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create", "patch", "delete"]
# Events on Phi3Models.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create"]
# spec.model.credentialsSecretRef: MLflow credentials, read by name only.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
# In-cluster runtime image builds: the Job and the ConfigMap that holds its Dockerfile.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "create", "patch"]
{{- end }}

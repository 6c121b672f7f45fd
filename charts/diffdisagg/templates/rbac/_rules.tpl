{{/*
The operator's permissions, exactly what it uses and nothing more; tests/cluster/test_charts.py proves it in
both directions by comparing these rules with the (verb, resource) pairs the apiserver's audit log records
for the operator's ServiceAccount while it reconciles, updates, scales and deletes a deployment.

diffdisagg.rbac.namespacedRules: rules on namespaced objects; a ClusterRole when the operator watches every
namespace, a Role in .Values.watchNamespace otherwise. Usage: {{- include "diffdisagg.rbac.namespacedRules" . | nindent 2 }}
*/}}
{{- define "diffdisagg.rbac.namespacedRules" -}}
# Its own resource: kopf lists and watches it and keeps its bookkeeping on it (patch); the reconcile reads it
# (get) and writes its status.
- apiGroups: ["diffdisagg.io"]
  resources: ["diffusiondisaggdeployments"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["diffdisagg.io"]
  resources: ["diffusiondisaggdeployments/status"]
  verbs: ["patch"]
# Children. Each kind is listed by the deployment's label (to find and prune what is no longer wanted) and
# deleted when pruned. Create-only kinds (the token Secret, the role scaler whose spec.replicas belongs to
# the HPA) are created with a POST and read back (get) when one already exists; the others are server-side
# applied (patch, plus create for the apply that creates them). Deployments and scalers are also watched.
- apiGroups: ["diffdisagg.io"]
  resources: ["diffusionrolescalers"]
  verbs: ["get", "list", "watch", "create", "delete"]
- apiGroups: ["diffdisagg.io"]
  resources: ["diffusionrolescalers/status"]
  verbs: ["patch"]
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "create", "delete"]
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["list", "create", "patch", "delete"]
- apiGroups: ["autoscaling"]
  resources: ["horizontalpodautoscalers"]
  verbs: ["list", "create", "patch", "delete"]
# kopf posts Kubernetes Events on the deployment it handles (decisions a user should see).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/*
diffdisagg.rbac.clusterRules: cluster-scoped permissions. kopf watches CustomResourceDefinitions to notice
its resources appear (cluster-wide mode only: with watchNamespace set the operator turns scanning off, so that
it needs no cluster-scoped permission at all). Usage: {{- include "diffdisagg.rbac.clusterRules" . | nindent 2 }}
*/}}
{{- define "diffdisagg.rbac.clusterRules" -}}
{{- if not .Values.watchNamespace }}
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- end }}
{{- end }}

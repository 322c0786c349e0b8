{{/* Chart name. */}}
{{- define "ctscreen.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Full name: <release>-<chart> unless the release already contains the chart name. */}}
{{- define "ctscreen.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ctscreen.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels on every object; pass (dict "ctx" $ "component" "triton"). */}}
{{- define "ctscreen.labels" -}}
helm.sh/chart: {{ include "ctscreen.chart" .ctx }}
{{ include "ctscreen.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: ctscreen
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ctscreen.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ctscreen.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "ctscreen.triton.fullname" -}}{{ include "ctscreen.fullname" . }}-triton{{- end -}}
{{/* The headless Service the gateway discovers Triton pods through. */}}
{{- define "ctscreen.triton.headless" -}}{{ include "ctscreen.fullname" . }}-triton-headless{{- end -}}
{{- define "ctscreen.gateway.fullname" -}}{{ include "ctscreen.fullname" . }}-gateway{{- end -}}

{{- define "ctscreen.gateway.serviceAccountName" -}}
{{- if .Values.gateway.serviceAccount.create -}}
{{- default (include "ctscreen.gateway.fullname" .) .Values.gateway.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.gateway.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* repository:tag[@digest]; pass (dict "image" .Values.x.image "tag" <default tag>). */}}
{{- define "ctscreen.image" -}}
{{- printf "%s:%s" .image.repository (default .tag .image.tag) -}}
{{- with .image.digest }}@{{ . }}{{ end -}}
{{- end -}}

{{- define "ctscreen.gateway.image" -}}
{{- include "ctscreen.image" (dict "image" .Values.gateway.image "tag" .Chart.AppVersion) -}}
{{- end -}}

{{- define "ctscreen.triton.serviceAccountName" -}}
{{- if .Values.triton.serviceAccount.create -}}
{{- default (include "ctscreen.triton.fullname" .) .Values.triton.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.triton.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Replicas of a Deployment another controller may own: the value when nothing else scales it; when an
autoscaler does, the live count (lookup), so switching autoscaling on or off never resets the Deployment
to 1 replica; nothing when it does not exist yet (or offline: helm template). Pass
(dict "ctx" $ "name" <deployment> "replicas" <int> "autoscaled" <bool>). */}}
{{- define "ctscreen.replicas" -}}
{{- if not .autoscaled }}
replicas: {{ .replicas }}
{{- else }}
{{- $live := lookup "apps/v1" "Deployment" .ctx.Release.Namespace .name }}
{{- if and $live $live.spec $live.spec.replicas }}
replicas: {{ $live.spec.replicas }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Rollout settings of a Deployment from values (rollout: maxSurge, maxUnavailable, progressDeadlineSeconds). */}}
{{- define "ctscreen.rollout" -}}
progressDeadlineSeconds: {{ .progressDeadlineSeconds }}
strategy:
  type: RollingUpdate
  rollingUpdate:
    maxSurge: {{ .maxSurge }}
    maxUnavailable: {{ .maxUnavailable }}
{{- end -}}

{{/* topologySpreadConstraints with the component's selector filled in where a constraint has none.
Pass (dict "ctx" $ "component" "triton" "constraints" <list>). */}}
{{- define "ctscreen.topologySpread" -}}
{{- $sel := include "ctscreen.selectorLabels" (dict "ctx" .ctx "component" .component) | fromYaml -}}
{{- $out := list -}}
{{- range .constraints -}}
{{- $c := deepCopy . -}}
{{- if not (hasKey $c "labelSelector") -}}
{{- $_ := set $c "labelSelector" (dict "matchLabels" $sel) -}}
{{- end -}}
{{- $out = append $out $c -}}
{{- end -}}
{{- with $out }}
topologySpreadConstraints:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/* The CA bundle (caBundle.configMapName): environment, mount and volume for any container. */}}
{{- define "ctscreen.caBundle.env" -}}
{{- if .Values.caBundle.configMapName }}
- name: SSL_CERT_FILE
  value: /etc/ctscreen/ca/ca.crt
- name: REQUESTS_CA_BUNDLE
  value: /etc/ctscreen/ca/ca.crt
- name: AWS_CA_BUNDLE
  value: /etc/ctscreen/ca/ca.crt
{{- end }}
{{- end -}}
{{- define "ctscreen.caBundle.mount" -}}
{{- if .Values.caBundle.configMapName }}
- name: ca-bundle
  mountPath: /etc/ctscreen/ca
  readOnly: true
{{- end }}
{{- end -}}
{{- define "ctscreen.caBundle.volume" -}}
{{- with .Values.caBundle.configMapName }}
- name: ca-bundle
  configMap:
    name: {{ . }}
    items:
      - key: {{ $.Values.caBundle.key }}
        path: ca.crt
{{- end }}
{{- end -}}

{{/* Grace period: preStop sleep + Triton's exit timeout + a margin for the process to exit. */}}
{{- define "ctscreen.triton.terminationGracePeriodSeconds" -}}
{{- add .Values.triton.drain.preStopSleepSeconds .Values.triton.drain.exitTimeoutSeconds 15 -}}
{{- end -}}

{{/* Restrictive container securityContext shared by every container. */}}
{{- define "ctscreen.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "ctscreen.imagePullSecrets" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
{{- range . }}
  - name: {{ . }}
{{- end }}
{{- end }}
{{- end -}}

{{/* HPA behavior shared by the HPA and the KEDA ScaledObject. */}}
{{- define "ctscreen.hpaBehavior" -}}
{{- $a := .Values.autoscaling -}}
scaleUp:
  stabilizationWindowSeconds: {{ $a.scaleUp.stabilizationWindowSeconds }}
  selectPolicy: Max
  policies:
    - type: Pods
      value: {{ $a.scaleUp.podsPerMinute }}
      periodSeconds: 60
scaleDown:
  stabilizationWindowSeconds: {{ $a.scaleDown.stabilizationWindowSeconds }}
  selectPolicy: Min
  policies:
    - type: Pods
      value: {{ $a.scaleDown.podsPerPeriod }}
      periodSeconds: {{ $a.scaleDown.periodSeconds }}
{{- end -}}

{{/* The Secret the gateway reads its OIDC settings from: gateway.auth.existingSecret, else the chart's
own (rendered when gateway.auth.oidcIssuer is set); empty when OIDC is off. */}}
{{- define "ctscreen.gateway.authSecret" -}}
{{- $a := .Values.gateway.auth -}}
{{- if $a.existingSecret -}}{{ $a.existingSecret }}
{{- else if $a.oidcIssuer -}}{{ include "ctscreen.gateway.fullname" . }}-auth
{{- end -}}
{{- end -}}

{{/* CTSCREEN_DATABASE_URL from the external Secret, or from the in-chart PostgreSQL's. */}}
{{- define "ctscreen.state.databaseEnv" -}}
{{- $db := .Values.state.database -}}
{{- if and (not $db.existingSecret) $db.postgresql.passwordSecret }}
- name: PGPASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ $db.postgresql.passwordSecret }}
      key: password
- name: CTSCREEN_DATABASE_URL
  value: {{ printf "postgresql://ctscreen:$(PGPASSWORD)@%s-postgresql:5432/ctscreen" (include "ctscreen.fullname" .) | quote }}
{{- else }}
- name: CTSCREEN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if $db.existingSecret }}
      name: {{ $db.existingSecret }}
      key: {{ $db.secretKey }}
      {{- else }}
      name: {{ include "ctscreen.fullname" . }}-postgresql
      key: url
      {{- end }}
{{- end }}
{{- end -}}

{{/*
HOME and the CUDA JIT cache on the writable /tmp volume: the root filesystem is read-only, and CUDA
writes its compute cache under $HOME/.nv by default.
*/}}
{{- define "ctscreen.triton.cudaHome" -}}
- name: HOME
  value: /tmp
- name: CUDA_CACHE_PATH
  value: /tmp/.nv/ComputeCache
{{- end -}}

{{/* A container's environment: the chart's entries (a YAML list, as text) with an extra list merged in
(gateway.extraEnv, triton.extraEnv). An extra entry naming a chart variable takes that entry's place, so the
list names each variable once (server-side apply, Helm 4's default, refuses a list with duplicate names) and
keeps its order (a $(VAR) reference sees only the variables above it); the other extras follow. Of two extras
of one name the later wins.
Pass (dict "chart" <text> "extra" <list>). */}}
{{- define "ctscreen.env" -}}
{{- $extra := dict -}}
{{- range .extra }}{{ $_ := set $extra .name . }}{{ end -}}
{{- $out := list -}}
{{- $placed := list -}}
{{- range (.chart | fromYamlArray) -}}
{{- if hasKey $extra .name -}}
{{- if not (has .name $placed) }}{{ $out = append $out (get $extra .name) }}{{ $placed = append $placed .name }}{{ end -}}
{{- else -}}
{{- $out = append $out . -}}
{{- end -}}
{{- end -}}
{{- range .extra -}}
{{- if not (has .name $placed) }}{{ $out = append $out (get $extra .name) }}{{ $placed = append $placed .name }}{{ end -}}
{{- end -}}
{{- with $out }}{{ toYaml . }}{{ end -}}
{{- end -}}

{{/* Labels of a pod template: the selector's (which win), the component's podLabels, commonLabels and the
recommended labels that select nothing (version, part-of, managed-by): cost and inventory tools (OpenCost,
Kubecost) read pods, not their Deployments. Pass (dict "ctx" $ "component" "gateway" "podLabels" <dict>). */}}
{{- define "ctscreen.podLabels" -}}
{{- $sel := include "ctscreen.selectorLabels" . | fromYaml -}}
{{- $recommended := dict "app.kubernetes.io/version" (.ctx.Chart.AppVersion | toString) "app.kubernetes.io/part-of" "ctscreen" "app.kubernetes.io/managed-by" .ctx.Release.Service -}}
{{- toYaml (merge (dict) $sel (.podLabels | default dict) (.ctx.Values.commonLabels | default dict) $recommended) -}}
{{- end -}}

{{/* Annotations of a pod template: the chart's (a dict), then the component's podAnnotations, whose keys win (one
key is never written twice). The chart's include the cluster autoscaler's
cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes, naming the pod's disk-backed emptyDir volumes (pass
their names as "local"): they hold scratch, copies and caches only, and the autoscaler does not move a pod with an
emptyDir it is not told of, so the node it runs on is never removed (a GPU node kept for one Triton pod).
Pass (dict "chart" <dict> "local" <list> "pod" <dict>). */}}
{{- define "ctscreen.podAnnotations" -}}
{{- $out := deepCopy .chart -}}
{{- with .local }}{{ $_ := set $out "cluster-autoscaler.kubernetes.io/safe-to-evict-local-volumes" (join "," .) }}{{ end -}}
{{- range $k, $v := (.pod | default dict) }}{{ $_ := set $out $k $v }}{{ end -}}
{{- toYaml $out -}}
{{- end -}}

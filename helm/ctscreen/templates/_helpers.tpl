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

{{- define "ctscreen.gateway.image" -}}
{{- printf "%s:%s" .Values.gateway.image.repository (default .Chart.AppVersion .Values.gateway.image.tag) -}}
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

{{/* CTSCREEN_DATABASE_URL from the external Secret, or from the in-chart PostgreSQL's. */}}
{{- define "ctscreen.state.databaseEnv" -}}
- name: CTSCREEN_DATABASE_URL
  valueFrom:
    secretKeyRef:
      {{- if .Values.state.database.existingSecret }}
      name: {{ .Values.state.database.existingSecret }}
      key: {{ .Values.state.database.secretKey }}
      {{- else }}
      name: {{ include "ctscreen.fullname" . }}-postgresql
      key: url
      {{- end }}
{{- end -}}

{{/* The gateway container's own environment (gateway-deployment.yaml merges gateway.extraEnv into it:
"ctscreen.env"). $g is .Values.gateway. */}}
{{- define "ctscreen.gateway.env" -}}
{{- $g := .Values.gateway }}
# Listening on every address holds the gateway to the auth requirement: without
# gateway.auth (or gateway.auth.insecure) it refuses to start, in one line.
- name: CTSCREEN_HOST
  value: "0.0.0.0"
{{- with include "ctscreen.gateway.authSecret" . }}
- name: CTSCREEN_AUTH_OIDC_ISSUER
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: oidcIssuer
- name: CTSCREEN_AUTH_OIDC_AUDIENCE
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: oidcAudience
{{- end }}
{{- if $g.auth.apiKeysSecret }}
- name: CTSCREEN_AUTH_API_KEYS_FILE
  value: /etc/ctscreen/auth/api-keys.json
{{- end }}
{{- if $g.auth.insecure }}
- name: CTSCREEN_AUTH_INSECURE
  value: "true"
{{- end }}
- name: CTSCREEN_LOG_FORMAT
  value: {{ $g.logFormat | quote }}
- name: CTSCREEN_TRITON_DISCOVERY
  value: {{ $g.discovery | quote }}
- name: CTSCREEN_TRITON_SERVICE
  value: {{ include "ctscreen.triton.headless" . | quote }}
- name: CTSCREEN_TRITON_NAMESPACE
  valueFrom:
    fieldRef:
      fieldPath: metadata.namespace
- name: CTSCREEN_TRITON_PORT_NAME
  value: grpc
- name: CTSCREEN_TRITON_GRPC_PORT
  value: {{ .Values.triton.ports.grpc | quote }}
# Discovery fills the endpoint list at run time.
- name: CTSCREEN_TRITON_URLS
  value: ""
- name: CTSCREEN_TRITON_BATCH_SIZE
  value: {{ $g.batchSize | quote }}
- name: CTSCREEN_TRITON_MAX_INFLIGHT
  value: {{ $g.maxInflightPerEndpoint | quote }}
- name: CTSCREEN_MAX_UPLOAD_BYTES
  value: {{ mul $g.maxUploadMiB 1048576 | int64 | quote }}
- name: CTSCREEN_MAX_REQUEST_HEAD_BYTES
  value: {{ mul $g.maxRequestHeadKiB 1024 | int64 | quote }}
{{- if gt (int $g.maxUploadMiB) 4096 }}
# the bytes of bodies in flight must hold one largest upload (the gateway refuses to start otherwise; 4 GiB
# by default): spooled to disk as they arrive, not held in memory
- name: CTSCREEN_UPLOAD_BUDGET_BYTES
  value: {{ mul $g.maxUploadMiB 1048576 | int64 | quote }}
{{- end }}
- name: CTSCREEN_STOW_MAX_PENDING_STUDIES
  value: {{ $g.maxPendingStudies | int64 | quote }}
- name: CTSCREEN_STOW_MAX_PENDING_BYTES
  value: {{ mulf $g.maxPendingGiB 1073741824 | int64 | quote }}
{{- if $g.maxBacklogSlices }}
- name: CTSCREEN_DICOM_MAX_BACKLOG_SLICES
  value: {{ $g.maxBacklogSlices | int64 | quote }}
{{- end }}
{{- if .Values.state.blobs.minFreeGiB }}
- name: CTSCREEN_DICOM_MIN_FREE_BYTES
  value: {{ mulf .Values.state.blobs.minFreeGiB 1073741824 | int64 | quote }}
{{- end }}
{{- if $g.dicom.enabled }}
- name: CTSCREEN_DICOM_PORT
  value: {{ $g.dicom.port | quote }}
- name: CTSCREEN_DICOM_AE_TITLE
  value: {{ $g.dicom.aeTitle | quote }}
- name: CTSCREEN_STOW_QUIET_PERIOD_S
  value: {{ $g.dicom.quietPeriodSeconds | quote }}
- name: CTSCREEN_DICOM_MAX_ASSOCIATIONS
  value: {{ $g.dicom.maxAssociations | quote }}
- name: CTSCREEN_DICOM_MAX_CONNECTIONS_PER_HOST
  value: {{ $g.dicom.maxConnectionsPerHost | quote }}
- name: CTSCREEN_DICOM_REQUEST_TIMEOUT_S
  value: {{ $g.dicom.timeouts.requestSeconds | quote }}
- name: CTSCREEN_DICOM_ACSE_TIMEOUT_S
  value: {{ $g.dicom.timeouts.acseSeconds | quote }}
- name: CTSCREEN_DICOM_DIMSE_TIMEOUT_S
  value: {{ $g.dicom.timeouts.dimseSeconds | quote }}
- name: CTSCREEN_DICOM_NETWORK_TIMEOUT_S
  value: {{ $g.dicom.timeouts.networkSeconds | quote }}
- name: CTSCREEN_DICOM_ACCEPT_NON_CT
  value: {{ $g.dicom.acceptNonCt | default "discard" | quote }}
{{- with $g.dicom.allowedPeers }}
- name: CTSCREEN_DICOM_ALLOWED_PEERS
  value: {{ join "," . | quote }}
{{- end }}
{{- with $g.dicom.urgentAeTitles }}
- name: CTSCREEN_DICOM_URGENT_AE_TITLES
  value: {{ join "," . | quote }}
{{- end }}
{{- if $g.dicom.tls.secretName }}
- name: CTSCREEN_DICOM_TLS_CERT
  value: /etc/ctscreen/dicom-tls/tls.crt
- name: CTSCREEN_DICOM_TLS_KEY
  value: /etc/ctscreen/dicom-tls/tls.key
{{- if $g.dicom.tls.mutual }}
- name: CTSCREEN_DICOM_TLS_CA
  value: /etc/ctscreen/dicom-tls/ca.crt
{{- if $g.dicom.tls.bindAeTitle }}
- name: CTSCREEN_DICOM_TLS_BIND_AE_TITLE
  value: "true"
{{- end }}
{{- end }}
{{- end }}
{{- end }}
{{- with $g.uidRoot }}
- name: CTSCREEN_UID_ROOT
  value: {{ . | quote }}
{{- end }}
{{- with $g.destinations.secretName }}
- name: CTSCREEN_DESTINATIONS_FILE
  value: {{ printf "/etc/ctscreen/destinations/%s" $g.destinations.key | quote }}
{{- end }}
- name: CTSCREEN_DATA_DIR
  value: {{ $g.resultsDir.path | quote }}
{{- include "ctscreen.state.databaseEnv" . | nindent 0 }}
{{- with .Values.state.blobs.s3 }}
{{- if .bucket }}
- name: CTSCREEN_BLOB_URL
  value: {{ printf "s3://%s/%s" .bucket (.prefix | trimAll "/") | trimSuffix "/" | quote }}
{{- with .endpoint }}
- name: CTSCREEN_S3_ENDPOINT_URL
  value: {{ . | quote }}
{{- end }}
{{- with .region }}
- name: CTSCREEN_S3_REGION
  value: {{ . | quote }}
{{- end }}
{{- if .credentialsSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ .credentialsSecret }}
      key: {{ .accessKeyIdKey }}
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ .credentialsSecret }}
      key: {{ .secretAccessKeyKey }}
{{- end }}
{{- end }}
{{- end }}
{{- if not .Values.state.blobs.s3.bucket }}
- name: CTSCREEN_BLOB_DIR
  value: {{ .Values.state.blobs.path | quote }}
{{- end }}
- name: CTSCREEN_DB_MIGRATE
  value: {{ .Values.state.migrateOnStart | quote }}
- name: CTSCREEN_JOB_DEADLINE_S
  value: {{ mul .Values.state.jobDeadlineHours 3600 | quote }}
- name: CTSCREEN_CASE_RUN_SLICES
  value: {{ $g.caseRule.runSlices | quote }}
{{- with $g.caseRule.runMm }}
- name: CTSCREEN_CASE_RUN_MM
  value: {{ . | quote }}
{{- end }}
- name: CTSCREEN_CASE_MIN_LUNG_FIELD_CM2
  value: {{ $g.caseRule.minLungFieldCm2 | quote }}
- name: CTSCREEN_CASE_MIN_BODY_CM2
  value: {{ $g.caseRule.minBodyCm2 | quote }}
- name: CTSCREEN_RESULT_RETENTION_S
  value: {{ mul .Values.state.retention.resultsDays 86400 | quote }}
- name: CTSCREEN_INSTANCE_RETENTION_S
  value: {{ mul .Values.state.retention.instancesDays 86400 | quote }}
- name: CTSCREEN_ORPHAN_SWEEP_INTERVAL_S
  value: {{ mul .Values.state.retention.orphanSweepHours 3600 | quote }}
- name: CTSCREEN_ORPHAN_GRACE_S
  value: {{ mul .Values.state.retention.orphanGraceMinutes 60 | quote }}
- name: CTSCREEN_ORPHAN_KEEP_S
  value: {{ mul .Values.state.retention.orphanKeepDays 86400 | quote }}
- name: CTSCREEN_SHUTDOWN_GRACE_S
  value: {{ $g.drain.jobGraceSeconds | quote }}
- name: CTSCREEN_METRICS_PORT
  value: {{ $g.metricsPort | quote }}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
{{- include "ctscreen.caBundle.env" . | nindent 0 }}
{{- end -}}

{{/*
Names, labels and the pieces every recserve pod shares (image, env, security). One place, so the
RayService, the StatefulSet, the Deployment and the CronJobs cannot drift apart.
*/}}

{{- define "recserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* release-chart, shortened to 40 characters: KubeRay appends a 5-character suffix and "-serve-svc"-like
endings to the RayService name, and Service names must fit in 63. */}}
{{- define "recserve.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "recserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels of one component: pass (dict "ctx" $ "component" "redis"). */}}
{{- define "recserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "recserve.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{/* All labels of one component's objects: pass (dict "ctx" $ "component" "redis"). */}}
{{- define "recserve.labels" -}}
helm.sh/chart: {{ include "recserve.chart" .ctx }}
{{ include "recserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
app.kubernetes.io/part-of: recserve
{{- with .ctx.Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "recserve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "recserve.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The recserve image reference, by digest when one is given. */}}
{{- define "recserve.image" -}}
{{- $tag := default .Chart.AppVersion .Values.image.tag }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository $tag }}
{{- end }}
{{- end }}

{{- define "recserve.serveServiceName" -}}
{{- printf "%s-serve" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.internalServiceName" -}}
{{- printf "%s-internal" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.redisServiceName" -}}
{{- printf "%s-redis" (include "recserve.fullname" .) }}
{{- end }}

{{- define "recserve.mlflowServiceName" -}}
{{- printf "%s-mlflow" (include "recserve.fullname" .) }}
{{- end }}

{{/* Secret names: an explicit existingSecret, else <fullname>-<suffix> (documented in NOTES.txt). */}}
{{- define "recserve.secretName" -}}
{{- default (printf "%s-%s" (include "recserve.fullname" .ctx) .suffix) .existing }}
{{- end }}

{{/*
A credential the chart generates once and keeps: the value already in the release's Secret (`lookup`, so
an upgrade keeps it), else a new random one. Pass (dict "ctx" $ "name" secretName "key" dataKey "length" n).
`helm template` cannot look up, so it prints a fresh value every time (the plain manifests in k8s/ name
existing Secrets instead).
*/}}
{{- define "recserve.keptSecretValue" -}}
{{- $secret := lookup "v1" "Secret" .ctx.Release.Namespace .name | default dict }}
{{- $data := get $secret "data" | default dict }}
{{- if get $data .key }}
{{- get $data .key | b64dec }}
{{- else }}
{{- randAlphaNum (int .length) }}
{{- end }}
{{- end }}

{{- define "recserve.apiKeysSecretName" -}}
{{- include "recserve.secretName" (dict "ctx" . "existing" .Values.auth.existingSecret "suffix" "api-keys") }}
{{- end }}

{{- define "recserve.redisAuthSecretName" -}}
{{- include "recserve.secretName" (dict "ctx" . "existing" .Values.redis.auth.existingSecret "suffix" "redis-auth") }}
{{- end }}

{{- define "recserve.mlflowAuthSecretName" -}}
{{- include "recserve.secretName" (dict "ctx" . "existing" .Values.mlflow.auth.existingSecret "suffix" "mlflow-auth") }}
{{- end }}

{{/*
The Redis commands recserve runs, the only ones its ACL user may run (besides redis.auth.extraCommands).
Found in the code, each with its caller:
  connection      PING (health checks, readiness probe), SELECT (a /db in the URL); AUTH needs no grant
  transactions    MULTI, EXEC, DISCARD (redis-py pipelines with transaction=True: the exporter's
                  dead-letter XADD + XACK)
  scripts         EVALSHA, EVAL, SCRIPT LOAD|EXISTS (redis-py's Script, also inside pipelines); the calls
                  inside a script are checked one by one: serve_app/events.py (SET NX EX, XADD, HGET, HSET,
                  HINCRBY, EXPIRE), serve_app/experiments.py (GET, HMGET, HINCRBY, HSETNX)
  event stream    XADD (shadow log, capped), XRANGE, XREVRANGE, XLEN, XINFO, XPENDING, EXISTS, TIME
                  (serve_app/events.py stream_stats, serve_app/experiments.py), XGROUP CREATE,
                  XREADGROUP, XAUTOCLAIM, XACK, XTRIM (training/exporter.py)
  state hashes    HGETALL (serve_app/features.py, experiments counts), HSET, HINCRBY, SET EX, EXPIRE
                  (serve_app/experiments.py)
  Feast online    HSET, HMGET, EXPIRE (online_write_batch, online_read), SCAN, DEL, HKEYS, HDEL (feast
                  apply removing a view or entity: feast/infra/online_stores/redis.py)
Not granted, among others: FLUSHALL/FLUSHDB, KEYS, CONFIG, DEBUG, MODULE, ACL, SHUTDOWN, CLIENT, MONITOR,
REPLICAOF, FUNCTION, SCRIPT FLUSH, pub/sub (no channels either).
*/}}
{{- define "recserve.redisCommands" -}}
{{- $commands := list "ping" "select" "multi" "exec" "discard" "evalsha" "eval" "script|load" "script|exists" "get" "set" "exists" "del" "expire" "time" "scan" "hget" "hset" "hsetnx" "hmget" "hgetall" "hincrby" "hkeys" "hdel" "xadd" "xrange" "xrevrange" "xlen" "xinfo" "xpending" "xgroup|create" "xreadgroup" "xautoclaim" "xack" "xtrim" }}
{{- /* redis-py's connect handshake names the library (CLIENT SETINFO, Redis >= 7.2; older servers know no
such command, and an ACL naming an unknown command stops Redis from starting). */}}
{{- $version := regexFind "^[0-9]+\\.[0-9]+(\\.[0-9]+)?" .Values.redis.image.tag }}
{{- if and $version (semverCompare ">=7.2.0-0" $version) }}
{{- $commands = append $commands "client|setinfo" }}
{{- end }}
{{- toJson $commands }}
{{- end }}

{{/* redis-server arguments of the ACL users: default off, the recserve user, the admin user. */}}
{{- define "recserve.redisAclArgs" -}}
{{- $auth := .Values.redis.auth }}
- --user
- default
- reset
- --user
- {{ $auth.username }}
- reset
- "on"
- ">$(REDIS_PASSWORD)"
- "~*"
{{- range (include "recserve.redisCommands" . | fromJsonArray) }}
- "+{{ . }}"
{{- end }}
{{- range $auth.extraCommands }}
- {{ . | quote }}
{{- end }}
- --user
- admin
- reset
- "on"
- ">$(REDIS_ADMIN_PASSWORD)"
- "~*"
- "&*"
- "+@all"
{{- end }}

{{- define "recserve.mlflowTrackingUri" -}}
{{- if .Values.mlflow.enabled }}
{{- printf "http://%s:5000" (include "recserve.mlflowServiceName" .) }}
{{- else }}
{{- required "mlflow.external.trackingUri is required when mlflow.enabled is false: serving loads models from the registry" .Values.mlflow.external.trackingUri }}
{{- end }}
{{- end }}

{{/*
Environment of every pod that runs recserve code (Ray head and workers, the CronJobs). Short Service
names only (no namespace), so the manifests keep working when kustomize moves them to another namespace.
Variables read by pydantic-settings (RECSERVE_*, REDIS_URL) and by the MLflow client (MLFLOW_*).
*/}}
{{- define "recserve.appEnv" -}}
{{- if .Values.redis.enabled }}
# The bundled Redis always requires its ACL user; $(REDIS_PASSWORD) is expanded by the kubelet (the
# password must be URL-safe: the generated ones are letters and digits).
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "recserve.redisAuthSecretName" . }}
      key: {{ .Values.redis.auth.secretKey }}
- name: REDIS_URL
  value: {{ printf "redis://%s:$(REDIS_PASSWORD)@%s:6379/0" .Values.redis.auth.username (include "recserve.redisServiceName" .) | quote }}
{{- else }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "recserve.secretName" (dict "ctx" . "existing" .Values.redis.external.existingSecret "suffix" "redis") }}
      key: {{ .Values.redis.external.secretKey }}
{{- end }}
# Feast's online store is the same Redis. Set explicitly: TrainingSettings validates its feature_store
# section (cluster profile needs a URL) before it would copy REDIS_URL into it.
- name: RECSERVE_FEATURE_STORE__REDIS_URL
  value: "$(REDIS_URL)"
- name: MLFLOW_TRACKING_URI
  value: {{ include "recserve.mlflowTrackingUri" . | quote }}
- name: RECSERVE_MLFLOW_TRACKING_URI
  value: {{ include "recserve.mlflowTrackingUri" . | quote }}
{{- include "recserve.mlflowClientEnv" . }}
- name: RECSERVE_MODEL_NAME
  value: {{ .Values.model.name | quote }}
- name: RECSERVE_FEATURE_STORE__PROFILE
  value: {{ .Values.featureStore.profile | quote }}
- name: RECSERVE_FEATURE_STORE__PROJECT
  value: {{ .Values.featureStore.project | quote }}
{{- if eq .Values.featureStore.profile "cluster" }}
- name: RECSERVE_FEATURE_STORE__REGISTRY_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "recserve.secretName" (dict "ctx" . "existing" .Values.featureStore.registry.existingSecret "suffix" "feast") }}
      key: {{ .Values.featureStore.registry.secretKey }}
{{- end }}
{{- end }}

{{/* MLflow client credentials of the recserve pods: the bundled server's admin account, or the external
server's credentials when a Secret is named. */}}
{{- define "recserve.mlflowClientEnv" -}}
{{- $secret := "" }}
{{- if and .Values.mlflow.enabled .Values.mlflow.auth.enabled }}
{{- $secret = include "recserve.mlflowAuthSecretName" . }}
{{- else if not .Values.mlflow.enabled }}
{{- $secret = .Values.mlflow.external.credentialsSecret }}
{{- end }}
{{- with $secret }}
- name: MLFLOW_TRACKING_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: username
- name: MLFLOW_TRACKING_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ . }}
      key: password
{{- end }}
{{- end }}

{{/* API keys, scopes, rate limit, demo and explain: the serving settings of the Ray containers. */}}
{{- define "recserve.authEnv" -}}
- name: RECSERVE_API__AUTH__ENABLED
  value: {{ .Values.auth.enabled | quote }}
{{- if .Values.auth.enabled }}
- name: RECSERVE_API__AUTH__KEYS_FILE
  value: {{ printf "%s/keys.json" (trimSuffix "/" .Values.auth.mountPath) | quote }}
{{- end }}
- name: RECSERVE_API__RATE_LIMIT__REQUESTS_PER_SECOND
  value: {{ .Values.auth.rateLimit.requestsPerSecond | toString | quote }}
- name: RECSERVE_API__RATE_LIMIT__BURST
  value: {{ .Values.auth.rateLimit.burst | int | quote }}
- name: RECSERVE_API__EXPLAIN_ENABLED
  value: {{ .Values.serve.explain | quote }}
- name: RECSERVE_DEMO__ENABLED
  value: {{ .Values.demo.enabled | quote }}
{{- end }}

{{/* The legacy admin key, for the serving pods only; optional so that a missing Secret means "no admin key". */}}
{{- define "recserve.apiKeyEnv" -}}
- name: {{ .Values.apiKey.envName }}
  valueFrom:
    secretKeyRef:
      name: {{ include "recserve.secretName" (dict "ctx" . "existing" .Values.apiKey.existingSecret "suffix" "api-key") }}
      key: {{ .Values.apiKey.secretKey }}
      optional: true
{{- end }}

{{/* Labels every pod of the release carries (the default-deny policy selects them all). */}}
{{- define "recserve.releasePodLabels" -}}
app.kubernetes.io/name: {{ include "recserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* A pod selector of release pods of some components: pass (dict "ctx" $ "components" list). */}}
{{- define "recserve.clientPodSelector" -}}
matchLabels:
  {{- include "recserve.releasePodLabels" .ctx | nindent 2 }}
matchExpressions:
  - key: app.kubernetes.io/component
    operator: In
    values:
      {{- toYaml .components | nindent 6 }}
{{- end }}

{{- define "recserve.clientPeers" -}}
# Serving pods and the jobs of this release: the only clients of Redis and MLflow.
- podSelector:
    {{- include "recserve.clientPodSelector" (dict "ctx" . "components" (list "serve" "training" "materialization")) | nindent 4 }}
{{- end }}

{{/* Ports Ray pods open to each other: all TCP ports but the dashboard's 8265 (operator only). */}}
{{- define "recserve.rayPeerPorts" -}}
- protocol: TCP
  port: 1
  endPort: 8264
- protocol: TCP
  port: 8266
  endPort: 65535
{{- end }}

{{/* The port of a URL: explicit, else 443 for https and 80 otherwise. */}}
{{- define "recserve.urlPort" -}}
{{- $url := urlParse . }}
{{- $hostPort := splitList ":" $url.host }}
{{- if gt (len $hostPort) 1 }}{{ last $hostPort }}{{ else if eq $url.scheme "https" }}443{{ else }}80{{ end }}
{{- end }}

{{/* networkPolicy.externalEgress as egress rules. */}}
{{- define "recserve.externalEgress" -}}
{{- range .Values.networkPolicy.externalEgress }}
- ports:
    {{- range .ports }}
    - protocol: {{ .protocol | default "TCP" }}
      port: {{ .port }}
      {{- with .endPort }}
      endPort: {{ . }}
      {{- end }}
    {{- end }}
  {{- with .to }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- end }}

{{/* Egress of the recserve pods (Ray, CronJobs): Redis, MLflow, externalEgress. */}}
{{- define "recserve.appEgress" -}}
{{- if .Values.redis.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "recserve.selectorLabels" (dict "ctx" . "component" "redis") | nindent 10 }}
  ports:
    - protocol: TCP
      port: 6379
{{- end }}
{{- if .Values.mlflow.enabled }}
- to:
    - podSelector:
        matchLabels:
          {{- include "recserve.selectorLabels" (dict "ctx" . "component" "mlflow") | nindent 10 }}
  ports:
    - protocol: TCP
      port: 5000
{{- else if .Values.mlflow.external.trackingUri }}
# The external MLflow server's port (any address: its IP is not known here).
- ports:
    - protocol: TCP
      port: {{ include "recserve.urlPort" .Values.mlflow.external.trackingUri }}
{{- end }}
{{- include "recserve.externalEgress" . }}
{{- end }}

{{/* Pod-level fields every recserve pod shares. Pass the root context. */}}
{{- define "recserve.podSecurity" -}}
serviceAccountName: {{ include "recserve.serviceAccountName" . }}
securityContext:
  {{- toYaml .Values.podSecurityContext | nindent 2 }}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{/* Ray pods (head and workers): volumes, mounts and environment. */}}
{{- define "recserve.rayVolumeMounts" -}}
# Writable paths on a read-only root: Ray's session dir and bundle cache under /tmp, its object store in /dev/shm.
- name: tmp
  mountPath: /tmp
- name: shm
  mountPath: /dev/shm
{{- if .Values.eventSpool.enabled }}
# The EventWriter's spool of events accepted while Redis is unavailable.
- name: event-spool
  mountPath: {{ .Values.eventSpool.mountPath }}
{{- end }}
{{- if .Values.auth.enabled }}
# The hashed API keys; no subPath, so an edited Secret reaches the running pods (the Ingress re-reads it).
- name: api-keys
  mountPath: {{ .Values.auth.mountPath }}
  readOnly: true
{{- end }}
{{- end }}
{{- define "recserve.rayVolumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.rayService.tmpSizeLimit }}
- name: shm
  emptyDir:
    medium: Memory
    sizeLimit: {{ .Values.rayService.shmSizeLimit }}
{{- with .Values.eventSpool }}
{{- if .enabled }}
- name: event-spool
  {{- if .persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .persistence.existingClaim | default (include "recserve.eventSpoolClaim" $) }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .sizeLimit }}
  {{- end }}
{{- end }}
{{- end }}
{{- if .Values.auth.enabled }}
- name: api-keys
  secret:
    secretName: {{ include "recserve.apiKeysSecretName" . }}
    defaultMode: 0440
    items:
      - key: {{ .Values.auth.secretKey }}
        path: keys.json
{{- end }}
{{- end }}
{{- define "recserve.eventSpoolClaim" -}}
{{ include "recserve.fullname" . }}-event-spool
{{- end }}
{{- define "recserve.rayEnv" -}}
{{ include "recserve.appEnv" . | trim }}
{{ include "recserve.apiKeyEnv" . | trim }}
{{ include "recserve.authEnv" . | trim }}
- name: RECSERVE_MODELS__URI
  value: {{ printf "models:/%s@%s" .Values.model.name .Values.model.alias | quote }}
{{- with .Values.experiment }}
- name: RECSERVE_EXPERIMENT
  value: {{ toJson . | quote }}
{{- end }}
# Feast's local files and the bundle cache (<data_dir>/bundle_cache) on the /tmp emptyDir.
- name: RECSERVE_FEATURE_STORE__DATA_DIR
  value: /tmp/recserve
- name: RECSERVE_EVENT_SPOOL__ENABLED
  value: {{ .Values.eventSpool.enabled | quote }}
{{- if .Values.eventSpool.enabled }}
- name: RECSERVE_EVENT_SPOOL__DIRECTORY
  value: {{ .Values.eventSpool.mountPath | quote }}
- name: RECSERVE_EVENT_SPOOL__MAX_BYTES
  value: {{ .Values.eventSpool.maxBytes | int64 | quote }}
- name: RECSERVE_EVENT_SPOOL__RETRY_AFTER_SECONDS
  value: {{ .Values.eventSpool.retryAfterSeconds | int | quote }}
{{- end }}
{{- range $name, $value := .Values.rayService.rayEnv }}
- name: {{ $name }}
  value: {{ $value | quote }}
{{- end }}
{{- with .Values.rayService.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
serveConfigV2 of the RayService: one application built by serve.importPath, one entry per key of
serve.deployments (Helm ranges over a map in sorted key order, so the output is stable).
*/}}
{{/*
The stage deployments of `serve.placement`, named as serve_app/placement.py names them: a JSON list of
{name, first} (first: the group's first stage, whose split entry a custom group falls back to). `fused`
has none (the chain runs in the Ingress replicas). A list of groups must hold each stage once, in chain
order, in groups of consecutive stages: exactly what joining the groups gives back the chain.
*/}}
{{- define "recserve.placementGroups" -}}
{{- $chain := list "user_tower" "retriever" "ranker" "reranker" }}
{{- $single := dict "user_tower" "UserTower" "retriever" "Retriever" "ranker" "Ranker" "reranker" "ReRanker" }}
{{- $named := dict "user_tower,retriever" "Retrieval" "ranker,reranker" "Ranking" "user_tower,retriever,ranker,reranker" "Pipeline" }}
{{- $placement := .Values.serve.placement }}
{{- $groups := list }}
{{- if kindIs "string" $placement }}
{{- if eq $placement "split" }}
{{- $groups = list (list "user_tower") (list "retriever") (list "ranker") (list "reranker") }}
{{- else if eq $placement "two-tier" }}
{{- $groups = list (list "user_tower" "retriever") (list "ranker" "reranker") }}
{{- else if ne $placement "fused" }}
{{- fail (printf "serve.placement: unknown preset %q (expected split, two-tier, fused, or a list of groups of consecutive stages such as [[user_tower, retriever], [ranker, reranker]])" $placement) }}
{{- end }}
{{- else }}
{{- $flat := list }}
{{- range $placement }}
{{- if not (kindIs "slice" .) }}
{{- fail "serve.placement: expected a preset name or a list of lists of stage names" }}
{{- end }}
{{- if eq (len .) 0 }}
{{- fail "serve.placement: a group holds at least one stage" }}
{{- end }}
{{- $flat = concat $flat . }}
{{- end }}
{{- if ne (join "," $flat) (join "," $chain) }}
{{- fail (printf "serve.placement: %s is not the chain user_tower, retriever, ranker, reranker cut into groups of consecutive stages, each stage once, in order" (toJson $placement)) }}
{{- end }}
{{- $groups = $placement }}
{{- end }}
{{- $out := list }}
{{- range $groups }}
{{- $key := join "," . }}
{{- $name := get $named $key }}
{{- if not $name }}
{{- range . }}{{ $name = printf "%s%s" $name (get $single .) }}{{ end }}
{{- end }}
{{- $out = append $out (dict "name" $name "first" (get $single (first .))) }}
{{- end }}
{{- toJson $out }}
{{- end }}

{{- define "recserve.serveConfig" -}}
{{- $all := .Values.serve.deployments }}
{{- $deployments := list }}
{{- /* The Ingress first, the placement's stage deployments, the EventWriter last (as serve_config()). */}}
{{- $entries := list (dict "name" "Ingress" "first" "Ingress") }}
{{- range (include "recserve.placementGroups" . | fromJsonArray) }}
{{- $entries = append $entries . }}
{{- end }}
{{- $entries = append $entries (dict "name" "EventWriter" "first" "EventWriter") }}
{{- range $entries }}
{{- $cfg := get $all .name | default (get $all .first) | default (dict) }}
{{- if and (eq .name "Ingress") (eq (toJson $.Values.serve.placement) (toJson "fused")) }}
{{- /* The Ingress hosts the whole chain: serve.fusedIngress over its own options (serve_config()). */}}
{{- $cfg = mergeOverwrite (deepCopy $cfg) (deepCopy (default (dict) $.Values.serve.fusedIngress)) }}
{{- end }}
{{- $deployments = append $deployments (merge (dict "name" .name) (deepCopy $cfg)) }}
{{- end }}
{{- $args := deepCopy (default (dict) .Values.serve.args) }}
{{- $settings := deepCopy (default (dict) (get $args "settings")) }}
{{- $_ := set $settings "placement" .Values.serve.placement }}
{{- $_ = set $args "settings" $settings }}
{{- $app := dict "name" .Values.serve.appName "route_prefix" .Values.serve.routePrefix "import_path" .Values.serve.importPath "deployments" $deployments "args" $args }}
{{- /* In a cluster the proxies listen on every node's pod IP; serve_config.yaml's HeadOnly/127.0.0.1
are for a single machine. The other http_options and logging_config come from values. */}}
{{- $http := merge (dict "host" "0.0.0.0" "port" .Values.serve.port) (deepCopy .Values.serve.httpOptions) }}
{{- $config := dict "proxy_location" "EveryNode" "http_options" $http "applications" (list $app) }}
{{- with .Values.serve.loggingConfig }}
{{- $_ := set $config "logging_config" . }}
{{- end }}
{{- toYaml $config }}
{{- end }}

{{/* Checks of combinations the schema cannot express, with messages that say what to change. */}}
{{- define "recserve.validate" -}}
{{- if and (not .Values.rayService.autoscaler.enabled) (gt (len .Values.rayService.workerGroups) 0) }}
{{- range .Values.rayService.workerGroups }}
{{- if ne (int .minReplicas) (int .maxReplicas) }}
{{- fail (printf "rayService.workerGroups[%s]: minReplicas (%v) != maxReplicas (%v) but rayService.autoscaler.enabled is false; nothing would scale between them" .name .minReplicas .maxReplicas) }}
{{- end }}
{{- end }}
{{- end }}
{{- range .Values.rayService.workerGroups }}
{{- if or (lt (int .replicas) (int .minReplicas)) (gt (int .replicas) (int .maxReplicas)) }}
{{- fail (printf "rayService.workerGroups[%s]: replicas (%v) must lie between minReplicas (%v) and maxReplicas (%v)" .name .replicas .minReplicas .maxReplicas) }}
{{- end }}
{{- end }}
{{- if and (not .Values.redis.enabled) .Values.redis.auth.existingSecret }}
{{- fail "redis.auth.existingSecret applies to the bundled Redis only; with redis.enabled=false put the password into the URL in redis.external.existingSecret" }}
{{- end }}
{{- if and .Values.training.enabled (not .Values.data.persistence.enabled) }}
{{- fail "training.enabled needs data.persistence.enabled: the training CronJob reads its data set from the data PVC" }}
{{- end }}
{{- if and .Values.materialization.enabled (not .Values.data.persistence.enabled) }}
{{- fail "materialization.enabled needs data.persistence.enabled: Feast reads its batch sources from the data PVC" }}
{{- end }}
{{- end }}

{{/*
CronJob of a `recserve` subcommand. Pass (dict "ctx" $ "component" "training" "args" list
"job" .Values.training): job supplies schedule, activeDeadlineSeconds, resources, nodeSelector, tolerations.
*/}}
{{- define "recserve.cronJob" -}}
{{- $ctx := .ctx }}
{{- $job := .job }}
apiVersion: batch/v1
kind: CronJob
metadata:
  name: {{ include "recserve.fullname" $ctx }}-{{ .component }}
  namespace: {{ $ctx.Release.Namespace }}
  labels:
    {{- include "recserve.labels" (dict "ctx" $ctx "component" .component) | nindent 4 }}
spec:
  schedule: {{ $job.schedule | quote }}
  # A run that overlaps the previous one would race on the data PVC and the registry alias.
  concurrencyPolicy: Forbid
  startingDeadlineSeconds: 600
  successfulJobsHistoryLimit: 3
  failedJobsHistoryLimit: 3
  jobTemplate:
    spec:
      backoffLimit: 1
      activeDeadlineSeconds: {{ $job.activeDeadlineSeconds }}
      ttlSecondsAfterFinished: 86400
      template:
        metadata:
          labels:
            {{- include "recserve.labels" (dict "ctx" $ctx "component" .component) | nindent 12 }}
        spec:
          {{- include "recserve.podSecurity" $ctx | nindent 10 }}
          automountServiceAccountToken: false
          restartPolicy: Never
          containers:
            - name: {{ .component }}
              image: {{ include "recserve.image" $ctx }}
              imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
              command:
                - recserve
              args:
                {{- toYaml .args | nindent 16 }}
              env:
                {{- include "recserve.appEnv" $ctx | trim | nindent 16 }}
                - name: RECSERVE_DATA_DIR
                  value: {{ $ctx.Values.data.mountPath | quote }}
                - name: HOME
                  value: /tmp
              resources:
                {{- toYaml $job.resources | nindent 16 }}
              securityContext:
                {{- toYaml $ctx.Values.securityContext | nindent 16 }}
              volumeMounts:
                - name: tmp
                  mountPath: /tmp
                - name: data
                  mountPath: {{ $ctx.Values.data.mountPath }}
          volumes:
            - name: tmp
              emptyDir:
                sizeLimit: 8Gi
            - name: data
              persistentVolumeClaim:
                claimName: {{ include "recserve.fullname" $ctx }}-data
          {{- with $job.nodeSelector }}
          nodeSelector:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          {{- with $job.tolerations }}
          tolerations:
            {{- toYaml . | nindent 12 }}
          {{- end }}
{{- end }}

{{/*
maxmemory of the bundled Redis in MiB when sized by redis.sizing.expectedUsersMillions (> 0); empty
otherwise: baseMiB + users x mibPerMillionUsers + items x mibPerMillionItems, rounded up.
*/}}
{{- define "recserve.redisMaxmemoryMiB" -}}
{{- $s := .Values.redis.sizing -}}
{{- if gt (float64 $s.expectedUsersMillions) 0.0 -}}
{{- addf $s.baseMiB (mulf $s.expectedUsersMillions $s.mibPerMillionUsers) (mulf $s.expectedItemsMillions $s.mibPerMillionItems) | ceil | int -}}
{{- end -}}
{{- end }}

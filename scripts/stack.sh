#!/usr/bin/env bash
# The shared-services stack on one machine: PostgreSQL (Dagster's instance and MLflow's backend
# store), Redis (the Celery broker), an MLflow tracking server with served artifacts, and one
# dagster-celery worker per queue. Everything binds 127.0.0.1 and keeps its data under
# $ECG_R1_STACK_DIR (default .stack/, git-ignored).
#
#   scripts/stack.sh up        install what is missing (apt), start everything, write $STACK_DIR/env
#   scripts/stack.sh install   only install what is missing (PostgreSQL, Redis; exit 3: cannot)
#   scripts/stack.sh down      stop everything this script started (data is kept)
#   scripts/stack.sh status    what runs
#   scripts/stack.sh worker Q  start one more worker on queue Q (e.g. on a GPU box: gpu)
#
# Settings (environment): ECG_R1_STACK_DIR, ECG_R1_PG_PORT (55432), ECG_R1_REDIS_PORT (56379),
# ECG_R1_MLFLOW_PORT (55000), ECG_R1_STACK_WORKERS ("default gpu"; empty: none),
# ECG_R1_PYTHON (.venv/bin/python). Ports are not the services' defaults so that the stack does
# not collide with a system PostgreSQL or Redis on a shared machine.
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
STACK_DIR="${ECG_R1_STACK_DIR:-$ROOT/.stack}"
PG_PORT="${ECG_R1_PG_PORT:-55432}"
REDIS_PORT="${ECG_R1_REDIS_PORT:-56379}"
MLFLOW_PORT="${ECG_R1_MLFLOW_PORT:-55000}"
WORKERS="${ECG_R1_STACK_WORKERS-default gpu}"
PY="${ECG_R1_PYTHON:-$ROOT/.venv/bin/python}"
PG_ROLE=ecg_r1
RUN="$STACK_DIR/run"
LOGS="$STACK_DIR/logs"
PGDATA="$STACK_DIR/postgres"
ENV_FILE="$STACK_DIR/env"

log() { echo "stack: $*" >&2; }

pg_bin() {
  local dir
  for dir in /usr/lib/postgresql/*/bin; do
    [ -x "$dir/pg_ctl" ] && { echo "$dir"; return 0; }
  done
  return 1
}

install_missing() {
  if pg_bin >/dev/null && command -v redis-server >/dev/null; then
    return 0
  fi
  command -v apt-get >/dev/null || { log "PostgreSQL or Redis missing and no apt-get: install postgresql and redis-server"; exit 3; }
  local sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  log "installing postgresql and redis-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  # Exit status 3: the services cannot be installed here (the stack test skips on it).
  $sudo apt-get update -qq || { log "apt-get update failed"; exit 3; }
  $sudo apt-get install -y -qq postgresql redis-server >/dev/null || { log "apt-get install failed"; exit 3; }
  # Debian's packages may start their own system instances; this stack never uses them.
}

# PostgreSQL refuses to run as root: as root it runs as the unprivileged `postgres` account.
as_pg() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

secret() { "$PY" -c 'import secrets; print(secrets.token_hex(16))'; }

write_env() {
  # Passwords are made once and kept: the databases hold them.
  local pg_password redis_password
  if [ -f "$STACK_DIR/secrets" ]; then
    # shellcheck disable=SC1091
    . "$STACK_DIR/secrets"
  else
    pg_password="$(secret)"
    redis_password="$(secret)"
    (umask 077; printf 'pg_password=%s\nredis_password=%s\n' "$pg_password" "$redis_password" > "$STACK_DIR/secrets")
  fi
  (umask 077; cat > "$ENV_FILE" <<EOF
# Written by scripts/stack.sh: source it to run jobs on the stack (make stack-run does).
export DAGSTER_HOME='$STACK_DIR/dagster-home'
export ECG_R1_EXECUTOR=celery
export ECG_R1_PG_HOST=127.0.0.1
export ECG_R1_PG_PORT=$PG_PORT
export ECG_R1_PG_USER=$PG_ROLE
export ECG_R1_PG_PASSWORD=$pg_password
export ECG_R1_PG_DB=dagster
export ECG_R1_CELERY_BROKER='redis://:$redis_password@127.0.0.1:$REDIS_PORT/0'
export ECG_R1_CELERY_BACKEND='redis://:$redis_password@127.0.0.1:$REDIS_PORT/1'
export ECG_R1_MLFLOW_URI='http://127.0.0.1:$MLFLOW_PORT'
EOF
  )
}

start_postgres() {
  local bin; bin="$(pg_bin)"
  mkdir -p "$PGDATA"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres: "$PGDATA"
  fi
  chmod 700 "$PGDATA"
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    log "initialising PostgreSQL in $PGDATA"
    # Local (socket) connections: the OS account that owns the cluster; TCP: passwords only.
    as_pg "$bin/initdb" -D "$PGDATA" --auth-local=peer --auth-host=scram-sha-256 -E UTF8 >/dev/null
  fi
  if as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    log "PostgreSQL already running"
  else
    as_pg "$bin/pg_ctl" -D "$PGDATA" -l "$PGDATA/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -c port=$PG_PORT -c unix_socket_directories='$PGDATA'" >/dev/null
  fi
  local pg_password
  pg_password="$(sed -n 's/^pg_password=//p' "$STACK_DIR/secrets")"
  psql_super() { as_pg "$bin/psql" -h "$PGDATA" -p "$PG_PORT" -d postgres -v ON_ERROR_STOP=1 -qtA "$@"; }
  if [ -z "$(psql_super -c "SELECT 1 FROM pg_roles WHERE rolname='$PG_ROLE'")" ]; then
    psql_super -c "CREATE ROLE $PG_ROLE LOGIN PASSWORD '$pg_password'" >/dev/null
  fi
  for db in dagster mlflow; do
    if [ -z "$(psql_super -c "SELECT 1 FROM pg_database WHERE datname='$db'")" ]; then
      psql_super -c "CREATE DATABASE $db OWNER $PG_ROLE" >/dev/null
    fi
  done
}

start_redis() {
  if [ -f "$RUN/redis.pid" ] && kill -0 "$(cat "$RUN/redis.pid")" 2>/dev/null; then
    log "Redis already running"
    return 0
  fi
  local redis_password
  redis_password="$(sed -n 's/^redis_password=//p' "$STACK_DIR/secrets")"
  mkdir -p "$STACK_DIR/redis"
  # The password travels on stdin, not argv: anyone who can queue a task can run code on a worker.
  printf 'bind 127.0.0.1\nport %s\nrequirepass %s\ndir %s\ndaemonize yes\npidfile %s\nlogfile %s\nappendonly yes\nsave ""\n' \
    "$REDIS_PORT" "$redis_password" "$STACK_DIR/redis" "$RUN/redis.pid" "$LOGS/redis.log" \
    | (umask 077; cat > "$STACK_DIR/redis/redis.conf")
  redis-server "$STACK_DIR/redis/redis.conf"
}

wait_http() {
  local url="$1" seconds="$2" pid="$3" logfile="$4"
  "$PY" - "$url" "$seconds" "$pid" "$logfile" <<'EOF'
import os, sys, time, urllib.request
url, deadline, pid = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
while True:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(f"stack: the server for {url} exited; see {sys.argv[4]}")
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                break
    except OSError:
        pass
    if time.monotonic() > deadline:
        sys.exit(f"stack: {url} did not answer in {sys.argv[2]} s")
    time.sleep(0.5)
EOF
}

# Started in its own session (setsid): `down` stops the whole process tree with one signal.
start_detached() {
  local name="$1"; shift
  if [ -f "$RUN/$name.pid" ] && kill -0 "$(cat "$RUN/$name.pid")" 2>/dev/null; then
    log "$name already running"
    return 0
  fi
  setsid "$@" >"$LOGS/$name.log" 2>&1 < /dev/null &
  echo $! > "$RUN/$name.pid"
}

start_mlflow() {
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  mkdir -p "$STACK_DIR/mlflow-artifacts"
  # The store URI (with its password) goes through the environment, not argv. The driver is named:
  # MLflow would read a bare postgresql:// as psycopg 3; the stack installs psycopg2 (Dagster's).
  # Server-side jobs (GenAI trace scoring, archival) are off: they are unused here and cost seven
  # polling processes.
  MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false \
  MLFLOW_BACKEND_STORE_URI="postgresql+psycopg2://$ECG_R1_PG_USER:$ECG_R1_PG_PASSWORD@127.0.0.1:$PG_PORT/mlflow" \
    start_detached mlflow "$PY" -m mlflow server --serve-artifacts \
    --artifacts-destination "$STACK_DIR/mlflow-artifacts" --host 127.0.0.1 --port "$MLFLOW_PORT" --workers 1
  wait_http "http://127.0.0.1:$MLFLOW_PORT/health" 180 "$(cat "$RUN/mlflow.pid")" "$LOGS/mlflow.log"
}

start_worker() {
  local queue="$1"
  # shellcheck disable=SC1090
  . "$ENV_FILE"
  # One task at a time per worker (a training step takes the whole box); the broker settings
  # come from the same file the executor reads.
  # dagster-celery runs `celery` from the PATH: the environment's own.
  PATH="$(dirname "$PY"):$PATH" start_detached "worker-$queue" "$(dirname "$PY")/dagster-celery" worker start \
    -A dagster_celery.app -y "$ROOT/dagster_project/stack/celery.yaml" -q "$queue" \
    -n "ecg-r1-$queue" -l INFO -- --concurrency=1
}

up() {
  install_missing
  mkdir -p "$STACK_DIR" "$RUN" "$LOGS" "$STACK_DIR/dagster-home"
  # PostgreSQL runs as another account when we are root: it must be able to reach its folder.
  chmod 755 "$STACK_DIR"
  local started=$SECONDS
  write_env
  cp "$ROOT/dagster_project/stack/dagster.yaml" "$STACK_DIR/dagster-home/dagster.yaml"
  start_postgres
  log "PostgreSQL ready after $((SECONDS - started)) s"
  start_redis
  start_mlflow
  log "MLflow ready after $((SECONDS - started)) s"
  # Dagster's tables are created once here: workers starting side by side would race to create them.
  (. "$ENV_FILE"; "$PY" -m dagster instance migrate >"$LOGS/dagster-migrate.log" 2>&1) \
    || { log "dagster instance migrate failed; see $LOGS/dagster-migrate.log"; exit 1; }
  for queue in $WORKERS; do
    start_worker "$queue"
  done
  log "up in $((SECONDS - started)) s: PostgreSQL 127.0.0.1:$PG_PORT, Redis 127.0.0.1:$REDIS_PORT, MLflow http://127.0.0.1:$MLFLOW_PORT, workers: ${WORKERS:-none}"
  log "settings: source $ENV_FILE"
}

stop_pidfile() {
  local name="$1" pid
  [ -f "$RUN/$name.pid" ] || return 0
  pid="$(cat "$RUN/$name.pid")"
  if kill -0 "$pid" 2>/dev/null; then
    # The process group (setsid made the pid its leader): workers' pool processes and the
    # server's children go with it. TERM first: a worker hands its unfinished task back.
    kill -TERM -- "-$pid" 2>/dev/null || kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL -- "-$pid" 2>/dev/null || true
  fi
  rm -f "$RUN/$name.pid"
}

down() {
  local name bin
  for pidfile in "$RUN"/worker-*.pid; do
    [ -e "$pidfile" ] || continue
    name="$(basename "$pidfile" .pid)"
    stop_pidfile "$name"
  done
  stop_pidfile mlflow
  if [ -f "$RUN/redis.pid" ]; then
    local pid; pid="$(cat "$RUN/redis.pid")"
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$RUN/redis.pid"
  fi
  if [ -f "$PGDATA/PG_VERSION" ] && bin="$(pg_bin)"; then
    as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1 && as_pg "$bin/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null
  fi
  log "down"
}

status() {
  local bin
  if bin="$(pg_bin)" && [ -f "$PGDATA/PG_VERSION" ] && as_pg "$bin/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; then
    echo "postgres: running (127.0.0.1:$PG_PORT)"
  else
    echo "postgres: stopped"
  fi
  for pidfile in "$RUN"/*.pid; do
    [ -e "$pidfile" ] || continue
    if kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$(basename "$pidfile" .pid): running (pid $(cat "$pidfile"))"
    else
      echo "$(basename "$pidfile" .pid): dead"
    fi
  done
}

case "${1:-}" in
  up) up ;;
  install) install_missing ;;
  down) down ;;
  status) status ;;
  worker) [ -n "${2:-}" ] || { log "usage: $0 worker QUEUE"; exit 2; }; start_worker "$2" ;;
  *) echo "usage: $0 up|down|status|install|worker QUEUE" >&2; exit 2 ;;
esac

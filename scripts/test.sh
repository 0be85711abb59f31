#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls it).
# It prepares what the tests talk to, then runs the whole suite:
#   - RabbitMQ at 127.0.0.1:5672 (started with `rabbitmq-server -detached` if
#     it is installed and down);
#   - a MongoDB wire-protocol server (SecantusDB in .venv) unless
#     CHAT_TEST_MONGODB_URI already points at one;
#   - npm packages of the browser and Socket.IO tests.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

log() { printf '[test.sh] %s\n' "$*" >&2; }

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_port() {
  local port=$1 what=$2
  for _ in $(seq 1 300); do
    port_open "$port" && return 0
    sleep 0.1
  done
  log "$what did not open port $port"; return 1
}

cleanup() { [ -n "${secantus_pid:-}" ] && kill "$secantus_pid" 2>/dev/null || true; }
trap cleanup EXIT

# RabbitMQ (cluster tests).
if ! port_open 5672 && command -v rabbitmq-server >/dev/null; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ || true
fi

# MongoDB wire protocol (the MongoDB backend runs the store contract, the
# transfer round trip and its fault tests): SecantusDB from PyPI in .venv,
# unless CHAT_TEST_MONGODB_URI already points at a real MongoDB. Once it is
# started here, the MongoDB tests are required (they fail, never skip).
if [ -z "${CHAT_TEST_MONGODB_URI:-}" ]; then
  export SECANTUS_PID_FILE="${TMPDIR:-/tmp}/chatd-test-secantus-$$.pid"
  uri=$(scripts/start-secantus.sh 0)
  secantus_pid=$(cat "$SECANTUS_PID_FILE")
  export CHAT_TEST_MONGODB_URI="$uri"
  log "MongoDB wire server at $uri"
fi
export CHAT_REQUIRE_MONGODB=1

# npm packages for browser / Socket.IO tests.
for d in tests/browser tests/socketio bench/node-relay; do
  if [ -f "$d/package.json" ] && [ ! -d "$d/node_modules" ]; then
    log "npm install in $d"
    (cd "$d" && npm install --no-audit --no-fund --loglevel=error)
  fi
done

cargo test --locked --all-targets "$@"

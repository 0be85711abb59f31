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

# MongoDB wire protocol (store contract on the mongodb backend).
if [ -z "${CHAT_TEST_MONGODB_URI:-}" ] && [ -x scripts/start-secantus.sh ]; then
  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
  uri=$(scripts/start-secantus.sh "$port")
  secantus_pid=$(cat "$root/.venv/secantus-$port.pid" 2>/dev/null || true)
  export CHAT_TEST_MONGODB_URI="$uri"
  log "MongoDB wire server at $uri"
fi

# npm packages for browser / Socket.IO tests.
for d in tests/browser tests/socketio bench/node-relay; do
  if [ -f "$d/package.json" ] && [ ! -d "$d/node_modules" ]; then
    log "npm install in $d"
    (cd "$d" && npm install --no-audit --no-fund --loglevel=error)
  fi
done

cargo test --locked --all-targets "$@"

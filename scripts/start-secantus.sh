#!/usr/bin/env bash
# Starts SecantusDB (a MongoDB wire-protocol server, a one-node replica set
# named "secantus") in the background for tests, waits until it accepts
# connections, and prints its URI on stdout.
#
#   scripts/start-secantus.sh [PORT] [STORAGE]
#
#   PORT     loopback port; 0 or omitted picks a free one.
#   STORAGE  data directory; omitted = ":memory:" (gone when it stops).
#            With a directory the server runs with --sync-on-commit: without
#            it SecantusDB acknowledges a transaction with j:true before its
#            log is on disk, and a crash right after loses it (MongoDB
#            documents j:true as "in the on-disk journal"; chatd asks for it).
#
# Environment:
#   SECANTUS_VENV      virtual environment to use or create (default: .venv
#                      at the repository root). SecantusDB is GPL-2.0: it is
#                      installed here from PyPI, never vendored.
#   SECANTUS_PID_FILE  where to write the server's pid (default:
#                      ${TMPDIR:-/tmp}/secantus-PORT.pid); stop it with
#                      kill "$(cat FILE)".
#   SECANTUS_LOG       server log (default: ${TMPDIR:-/tmp}/secantus-PORT.log).
#   SECANTUS_WAIT_SECS how long to wait for the port (default 60).
#   SECANTUS_ARGS      extra secantusd-py flags (split on spaces).
#
# Example:
#   export CHAT_TEST_MONGODB_URI="$(scripts/start-secantus.sh 0)"
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${SECANTUS_VENV:-$root/.venv}"
port="${1:-0}"
storage="${2:-:memory:}"
wait_secs="${SECANTUS_WAIT_SECS:-60}"

log() { echo "start-secantus: $*" >&2; }

if [ ! -x "$venv/bin/secantusd-py" ]; then
    log "installing SecantusDB into $venv"
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check --pre SecantusDB >&2
fi

if [ "$port" = "0" ]; then
    port="$("$venv/bin/python" -c 'import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])')"
fi

tmp="${TMPDIR:-/tmp}"
pid_file="${SECANTUS_PID_FILE:-$tmp/secantus-$port.pid}"
log_file="${SECANTUS_LOG:-$tmp/secantus-$port.log}"

args=(--host 127.0.0.1 --port "$port" --storage-path "$storage")
if [ "$storage" != ":memory:" ]; then
    args+=(--sync-on-commit)
fi
# shellcheck disable=SC2206 # word splitting of SECANTUS_ARGS is intended
args+=(${SECANTUS_ARGS:-})

# setsid: the server must outlive this script and not get the caller's
# terminal signals; its output goes to the log, not to our stdout.
setsid "$venv/bin/secantusd-py" "${args[@]}" >"$log_file" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$pid_file"

# Poll until the port accepts a connection (the driver's own server
# selection then waits for the handshake). No fixed sleep: each try is a
# connect attempt with a short pause between failures.
deadline=$((SECONDS + wait_secs))
until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
        log "secantusd exited before listening; its log ($log_file):"
        tail -n 40 "$log_file" >&2 || true
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        log "port $port not accepting after ${wait_secs}s; stopping pid $pid"
        kill "$pid" 2>/dev/null || true
        exit 1
    fi
    sleep 0.1
done

log "secantusd pid $pid on 127.0.0.1:$port (pid file $pid_file, log $log_file)"
echo "mongodb://127.0.0.1:$port/?directConnection=true"

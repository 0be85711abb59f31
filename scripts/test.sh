#!/usr/bin/env bash
# The project's one test command (README "Run the tests"; .ci/run calls it).
#
#   scripts/test.sh [cargo test args...]     e.g. scripts/test.sh --test websocket
#
# 1. Checks what the tests need and, as root with apt-get, installs what is
#    missing (python3-aiosmtpd, chromium, nginx-light, python3-venv,
#    rabbitmq-server, nodejs/npm). Whatever is still missing is named, with
#    the test that needs it and how to install it, and the script stops
#    before building anything. CHAT_TEST_NO_INSTALL=1 only checks.
# 2. Starts what the tests talk to:
#    - RabbitMQ at 127.0.0.1:5672 (`rabbitmq-server -detached` if down);
#    - a MongoDB wire-protocol server (SecantusDB from PyPI in .venv) unless
#      CHAT_TEST_MONGODB_URI already points at one;
#    - the OpenAPI validator (openapi-spec-validator from PyPI in .venv);
#    - npm packages of the browser and Socket.IO tests.
#    What is started here is required: those tests then fail, never skip.
# 3. Runs every test binary (`cargo test --all-targets --no-fail-fast`) and
#    ends with a summary per binary: passed, failed, ignored. Exits non-zero
#    if anything failed or a test binary did not finish.
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

# ---- 1. prerequisites ---------------------------------------------------

# Each check: "<apt package>|<test (shell) condition>|<who needs it>".
# Debian package names; the tests use /usr/bin/python3 and /usr/bin/chromium.
checks=(
  "python3-aiosmtpd|/usr/bin/python3 -c 'import aiosmtpd'|tests/notify.rs (SMTP sink)"
  "chromium|test -x /usr/bin/chromium|tests/browser.rs, tests/admin_page.rs (/usr/bin/chromium)"
  "nginx-light|command -v nginx|tests/cluster.rs (load balancer test)"
  "python3-venv|python3 -c 'import venv, ensurepip'|SecantusDB and the OpenAPI validator in .venv"
  "rabbitmq-server|port_open 5672 || command -v rabbitmq-server|tests/cluster.rs (RabbitMQ at 127.0.0.1:5672)"
  "nodejs|node_ok|tests/browser.rs, tests/socketio.rs (Node.js 18+)"
  "npm|command -v npm|npm packages of tests/browser and tests/socketio"
)

node_ok() {
  command -v node >/dev/null || return 1
  local major
  major=$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)
  [ "$major" -ge 18 ]
}

missing() {
  local out=() c pkg cond
  for c in "${checks[@]}"; do
    IFS='|' read -r pkg cond _ <<<"$c"
    eval "$cond" >/dev/null 2>&1 || out+=("$pkg")
  done
  echo "${out[@]:-}"
}

apt_install() {
  log "apt-get install $*"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2 \
    || log "apt-get could not install everything"
}

need=$(missing)
if [ -n "$need" ] && [ -z "${CHAT_TEST_NO_INSTALL:-}" ] \
  && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  apt-get update -qq || true
  # Some nodejs builds bring npm (and conflict with Debian's npm): ask for
  # npm only if it is still missing after nodejs.
  first=${need/npm/}
  # shellcheck disable=SC2086 # one word per package
  [ -n "${first// /}" ] && apt_install $first
  need=$(missing)
  # shellcheck disable=SC2086
  [ -n "$need" ] && apt_install $need
  need=$(missing)
fi
if [ -n "$need" ]; then
  log "missing prerequisites (nothing was built or run):"
  for c in "${checks[@]}"; do
    IFS='|' read -r pkg _ who <<<"$c"
    if [[ " $need " == *" $pkg "* ]]; then
      log "  - $pkg: needed by $who; install: apt-get install $pkg"
    fi
  done
  [ "$(id -u)" = 0 ] || log "(run as root with apt-get and this script installs them itself)"
  exit 2
fi

# ---- 2. services ---------------------------------------------------------

cleanup() { [ -n "${secantus_pid:-}" ] && kill "$secantus_pid" 2>/dev/null || true; }
trap cleanup EXIT

if ! port_open 5672; then
  log "starting RabbitMQ"
  rabbitmq-server -detached || true
  wait_port 5672 RabbitMQ || true
fi

# MongoDB wire protocol (the MongoDB backend runs the store contract, the
# transfer round trip and its fault tests): SecantusDB from PyPI in .venv,
# unless CHAT_TEST_MONGODB_URI already points at a real MongoDB.
if [ -z "${CHAT_TEST_MONGODB_URI:-}" ]; then
  export SECANTUS_PID_FILE="${TMPDIR:-/tmp}/chatd-test-secantus-$$.pid"
  uri=$(scripts/start-secantus.sh 0)
  secantus_pid=$(cat "$SECANTUS_PID_FILE")
  export CHAT_TEST_MONGODB_URI="$uri"
  log "MongoDB wire server at $uri"
fi
export CHAT_REQUIRE_MONGODB=1

# The outside OpenAPI validator (tests/openapi.rs).
venv="${SECANTUS_VENV:-$root/.venv}"
[ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
if [ ! -x "$venv/bin/openapi-spec-validator" ]; then
  log "installing openapi-spec-validator into $venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check openapi-spec-validator >&2
fi
export CHAT_TEST_OPENAPI_VALIDATOR="$venv/bin/openapi-spec-validator"
export CHAT_REQUIRE_OPENAPI_VALIDATOR=1

# npm packages for browser / Socket.IO tests.
for d in tests/browser tests/socketio bench/node-relay; do
  if [ -f "$d/package.json" ] && [ ! -d "$d/node_modules" ]; then
    log "npm install in $d"
    (cd "$d" && npm install --no-audit --no-fund --loglevel=error)
  fi
done

# ---- 3. every test binary, then a summary --------------------------------

out="${TMPDIR:-/tmp}/chatd-test-$$.log"
set +e
cargo test --locked --all-targets --no-fail-fast "$@" 2>&1 | tee "$out"
status=${PIPESTATUS[0]}
set -e

# cargo prints "Running <target> (<path>)" before each binary and
# "test result: ok. N passed; N failed; N ignored; ..." after it.
summary=$(awk '
  /^ *Running / {
    if (cur != "" && !(cur in done)) { order[++n] = cur; res[cur] = "no result (crashed or aborted)" }
    cur = $2; if ($2 == "unittests") cur = $2 " " $3
    next
  }
  /^test result: / {
    p = $0; sub(/.* ok\. |.* FAILED\. /, "", p)
    split(p, f, /[ ;]+/)
    passed = f[1]; failed = f[3]; ignored = f[5]
    tp += passed; tf += failed; ti += ignored
    if (!(cur in done)) order[++n] = cur
    done[cur] = 1
    res[cur] = sprintf("%4d passed %4d failed %4d ignored", passed, failed, ignored)
    if (failed > 0) { res[cur] = res[cur] "   FAILED"; bad++ }
    next
  }
  END {
    if (cur != "" && !(cur in done)) { order[++n] = cur; res[cur] = "no result (crashed or aborted)" }
    for (i = 1; i <= n; i++) {
      if (res[order[i]] ~ /no result/) crashed++
      printf "  %-32s %s\n", order[i], res[order[i]]
    }
    printf "total: %d passed, %d failed, %d skipped\n", tp, tf, ti
    if (crashed > 0) printf "%d test binaries ended without a result\n", crashed
    if (n == 0) print "no test binary ran (build failed?)"
  }' "$out")
rm -f "$out"

echo
echo "==== test summary ===="
echo "$summary"
if [ "$status" -ne 0 ]; then
  echo "FAILED (cargo test exited $status)"
  exit "$status"
fi
echo "all test binaries passed"

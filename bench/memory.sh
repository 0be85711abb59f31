#!/usr/bin/env bash
# The memory check of issue 14: a fresh release chatd, ~2M direct messages, then 200
# registrations, then 10 s with no load; prints the node's RssAnon (target ≤ 96 MiB).
#
# Usage: bench/memory.sh [MESSAGES]   (default 2000000; needs target/release/{chatd,chat-bench},
#                                      i.e. `cargo build --release -p chatd -p chat-bench`)
#
# Steps, each printed with the node's RssAnon / VmRSS:
#   1. start chatd (default config, fresh SQLite database in a temp dir);
#   2. `chat-bench --scenario direct --pairs 10` (closed loop, window 32) in 10 s runs
#      until MESSAGES have been sent and acked (each run registers 20 users);
#   3. `chat-bench --scenario direct --pairs 100 --duration 1s`: 200 registrations
#      (argon2 on the blocking pool), then 10 s with every socket closed (`--settle 10s`),
#      and /proc/PID/status RssAnon is read.
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}/release
want=${1:-2000000}
dir=$(mktemp -d /tmp/chatd-mem.XXXXXX)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
CHAT__HTTP__LISTEN=127.0.0.1:$port CHAT__STORE__SQLITE__PATH=$dir/chat.db RUST_LOG=warn \
  "$target/chatd" >"$dir/chatd.log" 2>&1 &
pid=$!
trap 'kill $pid 2>/dev/null; wait $pid 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done
mem() { awk '/^(RssAnon|VmRSS):/ {printf "%s %.1f MiB  ", $1, $2/1024}' /proc/$pid/status; echo; }
echo "fresh node (pid $pid): $(mem)"
sent=0
while [ "$sent" -lt "$want" ]; do
  n=$("$target/chat-bench" --target "http://127.0.0.1:$port" --server-pid $pid --scenario direct \
        --pairs 10 --duration 10s --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["acked"])')
  sent=$((sent + n))
  echo "acked $sent messages: $(mem)"
done
"$target/chat-bench" --target "http://127.0.0.1:$port" --server-pid $pid --scenario direct \
  --pairs 100 --duration 1s --settle 10s --json >"$dir/last.json"
python3 - "$dir/last.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
anon, rss = r["server_rss_anon_kib"], r["server_rss_kib"]
print(f"+200 registrations, 10 s after the load stopped: RssAnon {anon/1024:.1f} MiB, VmRSS {rss/1024:.1f} MiB "
      f"(target RssAnon <= 96 MiB: {'met' if anon <= 96*1024 else 'NOT met'})")
PY
echo "smaps of the largest anonymous mappings (KiB):"
awk '/^[0-9a-f]+-[0-9a-f]+ / {m=$0} /^Anonymous:/ && $2 > 4096 {print $2, m}' /proc/$pid/smaps | sort -rn | head -8

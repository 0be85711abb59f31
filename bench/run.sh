#!/usr/bin/env bash
# One command for the whole benchmark (issue 7):
#   builds chatd, bench-relay and chat-bench in release, installs the Node relay's
#   dependencies, raises the open-file limit, then runs `chat-bench --suite`, which
#   starts chatd, the durable Rust relay (SQLite group commit), the Rust relay and the
#   Node relay one after the other and drives each
#   with the same scenarios.
#
# Usage: bench/run.sh [--write] [--profile quick] [--servers chatd,relay-durable,relay,node]
#                     [--only direct-10,fanout,idle] [other chat-bench flags]
#
# Where the results go:
#   default   target/bench/: results.json, logs/, table.md, BENCHMARKS.png and a copy of
#             BENCHMARKS.md with the generated section replaced (diff it against the
#             committed one). Nothing committed changes.
#   --write   the committed files: the generated part of BENCHMARKS.md, BENCHMARKS.png and
#             bench/results/results.json (+ logs/). Only with the full profile: smoke
#             numbers of `--profile quick` never replace the measured ones.
set -euo pipefail
cd "$(dirname "$0")/.."

write=0
only=0
profile=full
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --write) write=1 ;;
    --profile) profile=${2:-}; args+=("$1" "${2:-}"); shift ;;
    --profile=*) profile=${1#--profile=}; args+=("$1") ;;
    --only|--only=*) only=1; args+=("$1"); [ "$1" = --only ] && { args+=("${2:-}"); shift; } ;;
    *) args+=("$1") ;;
  esac
  shift
done
if [ "$write" = 1 ] && [ "$only" = 1 ]; then
  echo "bench/run.sh: --write needs every case; drop --only (or --write)" >&2
  exit 2
fi
if [ "$write" = 1 ] && [ "$profile" != full ]; then
  echo "bench/run.sh: --write only with the full profile (got --profile $profile); drop --write to write into target/bench/" >&2
  exit 2
fi

export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
cargo build --release -p chatd -p chat-bench

if [ ! -d bench/node-relay/node_modules/ws ]; then
  (cd bench/node-relay && npm install --no-audit --no-fund)
fi

# Tens of thousands of sockets: one descriptor per socket in the bench and in the server.
# Only the hard limit can be reached without privileges; say so if it is low.
hard=$(ulimit -Hn)
ulimit -n "$hard"
if [ "$hard" != unlimited ] && [ "$hard" -lt 100000 ]; then
  echo "note: open-file limit is $hard here; the idle scenario holds fewer connections than that" >&2
fi

# The chart needs a TrueType font (DejaVu Sans on Debian: fonts-dejavu-core).
if [ ! -e /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] && [ ! -e /usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf ]; then
  echo "note: no DejaVu or Liberation font; install fonts-dejavu-core for the chart" >&2
fi

if [ "$write" = 1 ]; then
  out=(--out-dir bench/results --markdown BENCHMARKS.md --chart BENCHMARKS.png)
else
  dir="$CARGO_TARGET_DIR/bench"
  mkdir -p "$dir"
  cp BENCHMARKS.md "$dir/BENCHMARKS.md"
  out=(--out-dir "$dir" --markdown "$dir/BENCHMARKS.md" --chart "$dir/BENCHMARKS.png")
  echo "results go to $dir/ (bench/run.sh --write updates the committed BENCHMARKS.md)" >&2
fi

exec "$CARGO_TARGET_DIR/release/chat-bench" --suite --bin-dir "$CARGO_TARGET_DIR/release" \
  "${out[@]}" ${args[@]+"${args[@]}"}

#!/usr/bin/env bash
# One command for the whole benchmark (issue 7):
#   builds chatd, bench-relay and chat-bench in release, installs the Node relay's
#   dependencies, raises the open-file limit, then runs `chat-bench --suite`, which
#   starts chatd, the Rust relay and the Node relay one after the other, drives each
#   with the same scenarios, and rewrites the generated part of BENCHMARKS.md and
#   BENCHMARKS.png (raw results in bench/results/results.json).
#
# Usage: bench/run.sh [--profile quick] [--servers chatd,relay,node] [other chat-bench flags]
set -euo pipefail
cd "$(dirname "$0")/.."

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

exec "$CARGO_TARGET_DIR/release/chat-bench" --suite --bin-dir "$CARGO_TARGET_DIR/release" "$@"

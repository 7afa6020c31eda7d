#!/usr/bin/env bash
# Runs the README's quickstart exactly as written against a fresh
# `cargo run --release` (embedded deployment) and checks what a person would
# look at: the email in the mailbox and the run's state.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ -e data ]; then
  echo "quickstart: ./data exists; the quickstart starts from a fresh one (move it away first)" >&2
  exit 1
fi
work=$(mktemp -d)
cargo build --release -p zapflow
cargo run --release >"$work/zapflow.log" 2>&1 &
pid=$!
cleanup() {
  kill -INT "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf data new-comment.yaml apply.txt run.json
}
trap cleanup EXIT

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for _ in $(seq 1 600); do
  if [ -s data/admin-api-key ] && port_open 50051 && port_open 8080; then break; fi
  if ! kill -0 "$pid" 2>/dev/null; then cat "$work/zapflow.log" >&2; exit 1; fi
  sleep 0.2
done

sed -n '/<!-- quickstart:begin -->/,/<!-- quickstart:end -->/p' README.md |
  sed '/^```/d; /^<!--/d' >"$work/quickstart.sh"
bash -euo pipefail "$work/quickstart.sh" | tee "$work/out"

check() {
  if ! grep -q -- "$1" "$work/out"; then
    echo "quickstart: expected \"$1\" in the output above" >&2
    cat "$work/zapflow.log" >&2
    exit 1
  fi
}
check "created  New comment"
check "webhook URL     http://127.0.0.1:8080/hooks/catch/"
check "To: grace@example.com"
check "Subject: Thanks, Grace"
check "You wrote: Nice post!"
check '"status": "RUN_STATUS_SUCCEEDED"'
check '"status": "STEP_STATUS_SUCCEEDED"'
check "^status  *succeeded"
check "^0  *email  *succeeded  *1 "
echo "quickstart: ok"

#!/usr/bin/env bash
# The whole test suite: makes sure PostgreSQL and the test broker run, then
# runs every test of the workspace against them.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "postgres: not answering on 127.0.0.1:5432; starting the local cluster"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
pg_isready -h 127.0.0.1 -p 5432

# Every test makes a database of its own; drop those of earlier runs.
psql -h 127.0.0.1 -U postgres -qtAc "SELECT datname FROM pg_database WHERE datname LIKE 'zapflow\_test\_%'" |
  while read -r database; do dropdb -h 127.0.0.1 -U postgres --force "$database"; done

bash scripts/start-broker.sh

log=$(mktemp)
status=0
cargo test --workspace --all-targets "$@" 2>&1 | tee "$log" || status=$?
passed=$(grep -Eo '^test result: .* ([0-9]+) passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s += $1} END {print s + 0}')
failed=$(grep -Eo '^test result: .* ([0-9]+) failed' "$log" | grep -Eo '[0-9]+ failed' | awk '{s += $1} END {print s + 0}')
mkdir -p target
echo "tests: $passed passed, $failed failed" | tee target/test-summary.txt
rm -f "$log"
exit "$status"

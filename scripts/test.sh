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

bash scripts/start-broker.sh

cargo test --workspace "$@"

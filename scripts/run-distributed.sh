#!/usr/bin/env bash
# Runs every zapflow role in one process in the distributed deployment on
# this machine: makes sure PostgreSQL answers (and has a `zapflow` database)
# and a Kafka-protocol broker (tansu) runs, then starts `zapflow all`.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -1)" main start
  for _ in $(seq 1 50); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 0.2; done
fi
if ! psql -h 127.0.0.1 -U postgres -tAc "SELECT 1 FROM pg_database WHERE datname = 'zapflow'" | grep -q 1; then
  createdb -h 127.0.0.1 -U postgres zapflow
fi

bash scripts/start-broker.sh
export ZAPFLOW_DATABASE_URL=${ZAPFLOW_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/zapflow}
export ZAPFLOW_KAFKA_BROKERS=${ZAPFLOW_KAFKA_BROKERS:-127.0.0.1:19092}
exec cargo run --release -- all "$@"

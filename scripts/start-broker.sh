#!/usr/bin/env bash
# Starts the Kafka-protocol test broker (tansu, SQLite storage) on
# 127.0.0.1:19092 unless something already listens there. tansu is built
# once with cargo into a cache outside the repository.
set -euo pipefail

TANSU_VERSION=0.6.0
PORT=${ZAPFLOW_TEST_KAFKA_PORT:-19092}
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/zapflow
TANSU=$CACHE/tansu/bin/tansu

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }

if port_open; then
  echo "broker: already listening on 127.0.0.1:$PORT"
  exit 0
fi

if [ ! -x "$TANSU" ] || ! "$TANSU" --version 2>/dev/null | grep -q "$TANSU_VERSION"; then
  echo "broker: building tansu $TANSU_VERSION into $CACHE/tansu (about 17 minutes on 2 cores, once)"
  cargo install tansu --version "$TANSU_VERSION" --locked --features libsql --root "$CACHE/tansu"
fi

dir=$(mktemp -d "${TMPDIR:-/tmp}/zapflow-tansu.XXXXXX")
(
  cd "$dir"
  nohup "$TANSU" broker \
    --listener-url "tcp://127.0.0.1:$PORT" \
    --advertised-listener-url "tcp://127.0.0.1:$PORT" \
    --storage-engine sqlite://tansu.db >"$dir/tansu.log" 2>&1 &
  echo $! >"$dir/tansu.pid"
)
for _ in $(seq 1 100); do
  if port_open; then
    echo "broker: tansu listening on 127.0.0.1:$PORT (data and log in $dir)"
    exit 0
  fi
  sleep 0.1
done
echo "broker: tansu did not start; see $dir/tansu.log" >&2
cat "$dir/tansu.log" >&2
exit 1

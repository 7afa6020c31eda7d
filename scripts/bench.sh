#!/usr/bin/env bash
# Benchmarks zapflow's deployments on this machine, one after the other:
# embedded (`zapflow all` on SQLite), postgres (`zapflow all` on PostgreSQL)
# and distributed (the four roles as separate processes against PostgreSQL
# and a Kafka-protocol broker), with webhooks POSTed at several concurrencies
# and their emails caught by an in-process SMTP server. Everything listens
# and talks on 127.0.0.1.
#
#   bash scripts/bench.sh [--deployment embedded|postgres|distributed|all]
#                         [zapflow-bench flags, e.g. --phases 1:200,16:1000]
#
# Needs PostgreSQL at $ZAPFLOW_BENCH_POSTGRES (default
# postgres://postgres@127.0.0.1:5432, a user allowed to create databases).
# Uses the broker on 127.0.0.1:19092, starting tansu there if nothing listens.
# The benchmark database is dropped at the end unless ZAPFLOW_BENCH_KEEP_DB=1.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

postgres=${ZAPFLOW_BENCH_POSTGRES:-postgres://postgres@127.0.0.1:5432}
broker_host=127.0.0.1
broker_port=19092
tansu=${XDG_CACHE_HOME:-$HOME/.cache}/zapflow/tansu/bin/tansu
target_dir=${CARGO_TARGET_DIR:-target}

listening() {
    (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null
}

deployments=(embedded postgres distributed)
args=()
while [[ $# -gt 0 ]]; do
    case $1 in
        --deployment)
            [[ $2 == all ]] && deployments=(embedded postgres distributed) || deployments=("$2")
            shift 2
            ;;
        --deployment=*)
            value=${1#--deployment=}
            [[ $value == all ]] && deployments=(embedded postgres distributed) || deployments=("$value")
            shift
            ;;
        *)
            args+=("$1")
            shift
            ;;
    esac
done

broker_pid=
broker_dir=
databases=()

cleanup() {
    if [[ ${ZAPFLOW_BENCH_KEEP_DB:-0} != 1 ]]; then
        for database in "${databases[@]}"; do
            psql "$postgres/postgres" -qAt -v ON_ERROR_STOP=1 \
                -c "DROP DATABASE IF EXISTS $database WITH (FORCE)" >/dev/null ||
                echo "bench: could not drop database $database" >&2
        done
    fi
    if [[ -n $broker_pid ]]; then
        kill -TERM "$broker_pid" 2>/dev/null || true
        wait "$broker_pid" 2>/dev/null || true
    fi
    if [[ -n $broker_dir ]]; then
        rm -rf "$broker_dir"
    fi
}
trap cleanup EXIT

cargo build --release -p zapflow -p zapflow-bench

start_broker() {
    listening "$broker_host" "$broker_port" && return
    if [[ ! -x $tansu ]]; then
        echo "bench: nothing listens on $broker_host:$broker_port and there is no tansu at $tansu" >&2
        exit 1
    fi
    broker_dir=$(mktemp -d -t zapflow-bench-tansu.XXXXXX)
    echo "bench: starting tansu in $broker_dir" >&2
    (
        cd "$broker_dir"
        exec "$tansu" broker \
            --listener-url "tcp://$broker_host:$broker_port" \
            --advertised-listener-url "tcp://$broker_host:$broker_port" \
            --storage-engine sqlite://tansu.db >tansu.log 2>&1
    ) &
    broker_pid=$!
    for _ in $(seq 100); do
        listening "$broker_host" "$broker_port" && break
        kill -0 "$broker_pid" 2>/dev/null || { cat "$broker_dir/tansu.log" >&2; exit 1; }
        sleep 0.1
    done
    listening "$broker_host" "$broker_port" || { echo "bench: tansu did not start listening" >&2; exit 1; }
}

# Creates an empty database and sets database_url to it, without TLS: on
# loopback, as in compose.yaml, nothing needs it.
new_database() {
    local database
    database=zapflow_bench_$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
    psql "$postgres/postgres" -qAt -v ON_ERROR_STOP=1 -c "CREATE DATABASE $database" >/dev/null
    databases+=("$database")
    database_url=$postgres/$database?sslmode=disable
}

for deployment in "${deployments[@]}"; do
    flags=(--zapflow "$target_dir/release/zapflow" --deployment "$deployment")
    case $deployment in
        embedded) ;;
        postgres)
            new_database
            flags+=(--database-url "$database_url")
            ;;
        distributed)
            start_broker
            new_database
            flags+=(--database-url "$database_url" --kafka-brokers "$broker_host:$broker_port")
            ;;
        *) echo "bench: unknown deployment $deployment (embedded, postgres, distributed or all)" >&2; exit 2 ;;
    esac
    "$target_dir/release/zapflow-bench" "${flags[@]}" "${args[@]}"
    echo
done

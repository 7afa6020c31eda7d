# syntax=docker/dockerfile:1

# ---- build ------------------------------------------------------------------
# The rust image already carries what the native dependencies need: gcc, g++,
# make and perl for librdkafka (rdkafka-sys builds it bundled) and jemalloc,
# zlib1g-dev and pkg-config. aws-lc-sys builds with the C compiler alone, and
# the protobuf contract is compiled by protox, so neither cmake nor protoc is
# installed.
FROM rust:1.95-bookworm AS build
WORKDIR /src

COPY Cargo.toml Cargo.lock ./
COPY proto ./proto
COPY migrations ./migrations
COPY crates ./crates

# Cache mounts keep the registry and target/ between builds; the binary is
# copied out of the cached target/ in the same step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release -p zapflow --locked \
 && install -D -m 0755 target/release/zapflow /out/zapflow

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

# The binary links only libc, libm, libgcc_s and libz, all in the base image;
# ca-certificates is for HTTPS actions and SMTP over TLS.
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --home-dir /var/lib/zapflow --create-home zapflow

COPY --from=build /out/zapflow /usr/local/bin/zapflow

USER zapflow
WORKDIR /var/lib/zapflow

# In a container the listeners must face the network, not loopback.
ENV ZAPFLOW_GRPC_LISTEN=0.0.0.0:50051 \
    ZAPFLOW_HTTP_LISTEN=0.0.0.0:8080 \
    ZAPFLOW_DATA_DIR=/var/lib/zapflow/data

# 50051: gRPC API; 8080: webhook gateway.
EXPOSE 50051 8080

ENTRYPOINT ["zapflow"]
CMD ["--help"]

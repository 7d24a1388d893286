# syntax=docker/dockerfile:1
#
# Custos: the `custos` binary (engine, workers, guardians, CLI).
#   docker build -t custos .        (or: docker compose build)
#
# The build context should exclude ./target (it can be many GB): add a
# .dockerignore with `target` and `.git`. Only the paths copied below are used.

# ---- build ------------------------------------------------------------------
FROM rust:1.95-bookworm AS builder
WORKDIR /src

# Workspace manifest, lock file and toolchain pin (rust-toolchain.toml: 1.95.0).
COPY Cargo.toml Cargo.lock rust-toolchain.toml ./
# Every workspace member must be present for cargo to load the workspace.
COPY schemas ./schemas
COPY engine ./engine
COPY adapters ./adapters
COPY workers ./workers
COPY cli ./cli
COPY tests ./tests

# --locked: build exactly what Cargo.lock pins. Cache mounts keep the registry
# and target dir between builds; the binary is copied out of the cache mount.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/usr/local/cargo/git \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p custos \
 && install -m 0755 target/release/custos /usr/local/bin/custos

# ---- runtime ----------------------------------------------------------------
FROM debian:bookworm-slim

RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates tini \
 && rm -rf /var/lib/apt/lists/*

# Unprivileged user. /data is created here, owned by it, so that named volumes
# mounted on /data (guardians, engine) start with the right owner.
RUN groupadd --system --gid 10001 custos \
 && useradd --system --uid 10001 --gid custos --home-dir /data --shell /usr/sbin/nologin custos \
 && mkdir -p /data && chown custos:custos /data && chmod 0700 /data

COPY --from=builder /usr/local/bin/custos /usr/local/bin/custos

USER custos:custos
WORKDIR /data
# tini as PID 1: forwards SIGTERM to custos (graceful drain) and reaps children.
ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["custos", "--help"]

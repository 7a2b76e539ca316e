# syntax=docker/dockerfile:1
#
# Arrowport image: both binaries, /usr/local/bin/arrowport (the ingester) and
# /usr/local/bin/arrowport-operator, on a distroless glibc base, running as uid 65532.
#
#   docker build -t ghcr.io/arrowport/arrowport:0.1.0 .
#
# See helm/arrowport/README.md ("Image") for building for several platforms and pushing.

ARG RUST_VERSION=1.95
ARG DEBIAN_RELEASE=bookworm

# ---- build ------------------------------------------------------------------------------------------
# The Rust image is Debian with gcc, g++ and make: the ingester compiles DuckDB's C++ (bundled) in
# libduckdb-sys's build script. Build and run stages share the Debian release, hence the glibc.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io downloads and the compiled DuckDB between builds; the binaries are
# copied out of the cached target dir because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p arrowport -p arrowport-operator \
    && mkdir -p /out/bin /out/data \
    && cp target/release/arrowport target/release/arrowport-operator /out/bin/

# ---- run --------------------------------------------------------------------------------------------
# distroless/cc: glibc, libstdc++ (DuckDB needs both), CA certificates and tzdata; no shell, no package
# manager. The :nonroot tag's default user is uid/gid 65532.
FROM gcr.io/distroless/cc-debian12:nonroot
LABEL org.opencontainers.image.title="arrowport" \
      org.opencontainers.image.description="Arrowport: Arrow IPC and Arrow Flight ingest into DuckDB, and its Kubernetes operator" \
      org.opencontainers.image.source="https://github.com/arrowport/arrowport" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/bin/ /usr/local/bin/
# The database directory (a volume in Kubernetes) and working directory, writable by the runtime user,
# so that a plain `docker run IMAGE` writes ./arrowport.duckdb there.
COPY --from=build --chown=65532:65532 /out/data /var/lib/arrowport
USER 65532:65532
WORKDIR /var/lib/arrowport
EXPOSE 8888
ENTRYPOINT ["/usr/local/bin/arrowport"]
CMD ["serve"]

# syntax=docker/dockerfile:1
#
# Arrowport's three images, one target each (image/files names them and their layers):
#
#   arrowport           the ingester, /usr/local/bin/arrowport, for a DuckDB file (storage.kind: duckdb)
#   arrowport-lake      the same plus DuckDB's signed ducklake, icu and postgres_scanner extensions in
#                       /usr/local/lib/arrowport/extensions (duckdb.extension_directory), for a DuckLake
#   arrowport-operator  the operator alone, /usr/local/bin/arrowport-operator
#
# Each is stripped, on glibc and libstdc++ from Debian's packages (no shell), running as uid 65532. The
# ingester links DuckDB's official prebuilt shared library, /usr/local/lib/libduckdb.so (its licence in
# /usr/local/share/doc/duckdb/LICENSE).
#
#   docker build --target arrowport -t ghcr.io/arrowport/arrowport:0.1.0 .
#   docker build --target arrowport-lake -t ghcr.io/arrowport/arrowport-lake:0.1.0 .
#   docker build --target arrowport-operator -t ghcr.io/arrowport/arrowport-operator:0.1.0 .
#
# Without --target, `docker build .` builds the last stage, arrowport. The three share one build stage
# (both binaries compiled once; BuildKit reuses it for the second and third target).
#
# Fully static variant instead (DuckDB compiled into the binary, no libduckdb.so in the ingester images):
# this compiles DuckDB's C++, about 20+ minutes on two cores (much longer for arm64 under emulation),
# where the default build compiles only the Rust code:
#
#   docker build --build-arg CARGO_FEATURES=arrowport/bundled --target arrowport -t ghcr.io/arrowport/arrowport:0.1.0 .
#
# (outside Docker the same is `cargo build --release --features arrowport/bundled`).
#
# See helm/arrowport/README.md ("Image") for building for several platforms and pushing, and README.md
# ("The images") for building the same images without Docker (scripts/build-image, which CI runs and
# boots).

ARG RUST_VERSION=1.95
ARG NODE_VERSION=20
ARG PYTHON_VERSION=3.12
ARG DEBIAN_RELEASE=bookworm

# ---- duckdb -----------------------------------------------------------------------------------------
# scripts/duckdb-lib fetches DuckDB's prebuilt libduckdb.so (and its LICENSE) from DuckDB's npm package
# @duckdb/node-bindings-linux-<arch> with `npm pack`, and refuses it unless the tarball matches the
# SHA-256 pinned in the script. It picks the package from `uname -m`, which under
# `docker buildx build --platform ...` is the target platform's: linux/amd64 and linux/arm64 exist.
# Only the script is copied in, so this stage stays cached until the script (the DuckDB version) changes.
FROM node:${NODE_VERSION}-${DEBIAN_RELEASE}-slim AS duckdb
COPY scripts/duckdb-lib /usr/local/bin/duckdb-lib
RUN ARROWPORT_DUCKDB_DIR=/duckdb bash /usr/local/bin/duckdb-lib

# ---- extensions -------------------------------------------------------------------------------------
# scripts/duckdb-extensions fetches the DuckDB extensions a DuckLake needs (ducklake, icu,
# postgres_scanner; DuckDB's signed builds, published on PyPI as duckdb-extension-<name> wheels) with
# `pip download --require-hashes`, so pip refuses any wheel that does not match the SHA-256 pinned in the
# script, and unpacks the .duckdb_extension files into $ARROWPORT_DUCKDB_DIR/extensions. Like
# duckdb-lib it picks the platform from `uname -m` (the target platform's under buildx). Only the script is
# copied in, so this stage stays cached until the script (the DuckDB version or a hash) changes.
FROM python:${PYTHON_VERSION}-slim-${DEBIAN_RELEASE} AS extensions
COPY scripts/duckdb-extensions /usr/local/bin/duckdb-extensions
RUN ARROWPORT_DUCKDB_DIR=/duckdb ARROWPORT_VENV=/venv bash /usr/local/bin/duckdb-extensions \
    && test -f /duckdb/extensions/ducklake.duckdb_extension \
    && test -f /duckdb/extensions/icu.duckdb_extension \
    && test -f /duckdb/extensions/postgres_scanner.duckdb_extension

# ---- build ------------------------------------------------------------------------------------------
# The Rust image is Debian with gcc, g++ and make (the C++ tools matter only for the static variant).
# DuckDB is not compiled here: libduckdb-sys links the
# prebuilt /duckdb/libduckdb.so (DUCKDB_LIB_DIR), and ingestor/build.rs gives the binary the rpath
# $ORIGIN:$ORIGIN/../lib:/duckdb, so /usr/local/bin/arrowport finds /usr/local/lib/libduckdb.so in the
# final image. Build and run stages share the Debian release, hence the glibc.
FROM rust:${RUST_VERSION}-${DEBIAN_RELEASE} AS build
# Extra cargo features, e.g. arrowport/bundled for the static variant (see the top of this file).
ARG CARGO_FEATURES=""
COPY --from=duckdb /duckdb /duckdb
COPY --from=extensions /duckdb/extensions /duckdb/extensions
# scripts/duckdb-lib and scripts/duckdb-extensions find their files in /duckdb and fetch nothing.
ENV DUCKDB_LIB_DIR=/duckdb ARROWPORT_DUCKDB_DIR=/duckdb
WORKDIR /src
COPY . .
# Cache mounts keep the crate downloads and the compiled dependencies between builds; the binaries are
# copied out of the cached target dir because a cache mount is not part of the image.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked ${CARGO_FEATURES:+--features "$CARGO_FEATURES"} \
        -p arrowport -p arrowport-operator \
    && mkdir -p /out \
    && cp target/release/arrowport target/release/arrowport-operator /out/
# The images' layers, as directories (image/files names them): /image/base (the Debian packages of
# image/packages, unpacked: glibc, libstdc++, CA certificates, tzdata), /image/common (the non-root user),
# /image/ingester (arrowport, stripped, libduckdb.so unless DuckDB is compiled in, its licence, the
# database directory), /image/lake (the extension files) and /image/operator (arrowport-operator,
# stripped). .ci/image runs the same script to assemble the same images without Docker, and checks (with
# image/imagecheck.py) that each image stage below copies exactly its image's layers.
RUN bash scripts/build-image --bin-dir /out --rootfs /image

# ---- the images ---------------------------------------------------------------------------------------
# No shell, no package manager: glibc, libstdc++ (DuckDB needs both), CA certificates and tzdata from
# Debian, the layers above, user 65532 (nonroot). Ownership comes with the copied files (the database
# directory is 65532's). scripts/build-image gives each assembled image the configuration of the stage of
# the same name (with the stages it is built on), so every instruction from here on must be one
# image/imagecheck.py understands. `runtime` and `ingester` are shared steps, not images.
FROM scratch AS runtime
COPY --from=build /image/base/ /
COPY --from=build /image/common/ /
LABEL org.opencontainers.image.source="https://github.com/arrowport/arrowport" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PATH=/usr/local/bin:/usr/bin:/bin
USER 65532:65532

FROM runtime AS arrowport-operator
COPY --from=build /image/operator/ /
LABEL org.opencontainers.image.title="arrowport-operator" \
      org.opencontainers.image.description="Arrowport's Kubernetes operator: renders ArrowportStream resources into each ingester's streams ConfigMap"
WORKDIR /home/nonroot
# /metrics, /healthz and /readyz (ARROWPORT_OPERATOR_METRICS_ADDR).
EXPOSE 8080
ENTRYPOINT ["/usr/local/bin/arrowport-operator"]

FROM runtime AS ingester
COPY --from=build /image/ingester/ /
# The database directory (a volume in Kubernetes) and working directory, writable by the runtime user,
# so that a plain `docker run IMAGE` writes ./arrowport.duckdb there.
WORKDIR /var/lib/arrowport
EXPOSE 8888
ENTRYPOINT ["/usr/local/bin/arrowport"]
CMD ["serve"]

FROM ingester AS arrowport-lake
COPY --from=build /image/lake/ /
LABEL org.opencontainers.image.title="arrowport-lake" \
      org.opencontainers.image.description="Arrowport: Arrow IPC and Arrow Flight ingest into DuckDB or a DuckLake (with DuckDB's ducklake, icu and postgres_scanner extensions)"

FROM ingester AS arrowport
LABEL org.opencontainers.image.title="arrowport" \
      org.opencontainers.image.description="Arrowport: Arrow IPC and Arrow Flight ingest into a DuckDB file"

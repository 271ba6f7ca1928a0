# syntax=docker/dockerfile:1
# Multi-stage: the dependency layer is cached until Cargo.toml/Cargo.lock
# change; the runtime image holds only the binary and CA certificates, and
# runs as an unprivileged user (works with a read-only root filesystem).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock rustfmt.toml clippy.toml ./
# Build the dependencies against stub sources, so this layer is reused.
RUN mkdir src && echo 'fn main() {}' > src/main.rs && touch src/lib.rs \
 && cargo build --release --locked \
 && rm -rf src
COPY src src
COPY sql sql
RUN touch src/main.rs src/lib.rs && cargo build --release --locked \
 && strip target/release/logcursor

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin logcursor
COPY --from=build /src/target/release/logcursor /usr/local/bin/logcursor
# An environment-only configuration (LOGCURSOR_CONFIG=/etc/logcursor/env.toml).
COPY deploy/env/logcursor.toml /etc/logcursor/env.toml
USER 10001:10001
ENV LOGCURSOR_CONFIG=/etc/logcursor/logcursor.toml \
    LOG_FORMAT=json
# SIGTERM drains the tick in flight; see [service].shutdown_grace.
STOPSIGNAL SIGTERM
ENTRYPOINT ["/usr/local/bin/logcursor"]
CMD ["run"]

# molt: build the release binary, then run `molt serve` on the embedded default (SQLite and
# local files under /data) with the demo base model registered.
#
#   docker build -t molt .
#   docker run -p 8080:8080 -v molt-data:/data -e MOLT_ADMIN_TOKEN=change-me molt
#
# The first start prints the default tenant's API key (also in /data/first-key).

FROM rust:1.95-bookworm AS build
WORKDIR /src
# Manifests first so that dependency builds are cached across source changes.
COPY Cargo.toml Cargo.lock ./
COPY api/Cargo.toml api/Cargo.toml
COPY storage/Cargo.toml storage/Cargo.toml
COPY trainer/Cargo.toml trainer/Cargo.toml
# Embedded at compile time: migrations/ (`sqlx::migrate!`), openapi.yaml (served by the API)
# and the demo model (models/, built into the binary).
COPY migrations migrations
COPY openapi.yaml openapi.yaml
COPY models models
COPY api api
COPY storage storage
COPY trainer trainer
RUN cargo build --release --locked --bin molt

FROM debian:bookworm-slim
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
COPY --from=build /src/target/release/molt /usr/local/bin/molt
WORKDIR /app
# The demo base model is built into the binary; MOLT_MODELS_DIR=/some/folder replaces it.
ENV MOLT_LISTEN=0.0.0.0:8080 \
    MOLT_DATA_DIR=/data
VOLUME /data
EXPOSE 8080
CMD ["molt", "serve"]

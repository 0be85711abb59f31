# chatd in a container: build the release binary (stripped of symbols and
# debug info), run it on a slim Debian.
#   docker build -t chatd .
#   docker run -p 8080:8080 -e CHAT__AUTH__JWT_SECRET=... chatd
# docker-compose.yml runs a whole cluster from this image.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
# The release profile already leaves out debug info; the image also drops
# the symbol table (backtraces then show addresses only: use
# `cargo build --profile profiling` outside the image to profile).
ENV CARGO_PROFILE_RELEASE_STRIP=symbols
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin chatd \
 && cp target/release/chatd /usr/local/bin/chatd

FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/* \
 && useradd --system --home-dir /var/lib/chatd --create-home chatd
COPY --from=build /usr/local/bin/chatd /usr/local/bin/chatd
USER chatd
WORKDIR /var/lib/chatd
ENV CHAT__HTTP__LISTEN=0.0.0.0:8080 \
    CHAT__STORE__SQLITE__PATH=/var/lib/chatd/chatd.db \
    CHAT__LOG__FORMAT=json
EXPOSE 8080
# Ready = store and broker reachable (/healthz only says the process lives).
HEALTHCHECK --interval=5s --timeout=3s --start-period=10s --retries=12 \
    CMD curl -fsS http://127.0.0.1:8080/readyz || exit 1
ENTRYPOINT ["chatd"]

# Builds the example topology packages and the tempest command.
FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked -p tempest-examples --bins --examples -p tempest-cli

FROM debian:bookworm-slim
COPY --from=build /src/target/release/wordcount /usr/local/bin/wordcount
COPY --from=build /src/target/release/stream_wordcount /usr/local/bin/stream_wordcount
COPY --from=build /src/target/release/xadd /usr/local/bin/xadd
COPY --from=build /src/target/release/examples/quickstart /usr/local/bin/quickstart
COPY --from=build /src/target/release/tempest /usr/local/bin/tempest
ENV RUST_LOG=info
CMD ["quickstart"]

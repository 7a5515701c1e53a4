# butler as a FROM-scratch image: a static musl binary, CA certificates and a
# non-root user, nothing else. Builds for linux/amd64 and linux/arm64 alike:
#   docker build -t butler .
#   docker buildx build --platform linux/amd64,linux/arm64 -t butler .
# The configuration is expected at /etc/butler/butler.yaml (mount it read-only).

FROM rust:1-alpine AS build
RUN apk add --no-cache musl-dev ca-certificates
WORKDIR /src
COPY . .
# Rust's musl targets link statically by default.
RUN cargo build --release --locked \
 && cp target/release/butler /butler \
 && /butler --version
# The files the final stage needs besides the binary.
RUN mkdir -p /rootfs/etc/butler /rootfs/etc/ssl/certs \
 && cp /etc/ssl/certs/ca-certificates.crt /rootfs/etc/ssl/certs/ \
 && echo 'butler:x:65532:65532:butler:/nonexistent:/sbin/nologin' > /rootfs/etc/passwd \
 && echo 'butler:x:65532:' > /rootfs/etc/group

FROM scratch
COPY --from=build /rootfs/ /
COPY --from=build /butler /butler
USER 65532:65532
EXPOSE 8080
ENV BUTLER_CONFIG=/etc/butler/butler.yaml \
    BUTLER_LISTEN=0.0.0.0:8080
ENTRYPOINT ["/butler"]

#!/usr/bin/env bash
# Build the grpc-go stand-in for the SPIRE agent (benchmarks/goagent) for `just bench --agent go`:
# installs the Debian packages it needs (Go, grpc-go, protoc and its Go plugins) when missing,
# generates the Delegated Identity API from protos/ and prints the binary's path.
# GOPATH mode with Debian's Go libraries: nothing is downloaded beyond the packages.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
out=$root/.build/goagent
packages=(golang-go golang-google-grpc-dev golang-google-protobuf-dev
  golang-github-golang-protobuf-1-5-dev protobuf-compiler protoc-gen-go protoc-gen-go-grpc)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "ok installed" || missing+=("$package")
done
if ((${#missing[@]})); then
  echo "goagent: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq "${missing[@]}" >&2 ||
    { apt-get update -qq >&2 && apt-get install -y -qq "${missing[@]}" >&2; }
fi
types=spire/api/types/types.proto
delegated=spire/api/agent/delegatedidentity/v1/delegatedidentity.proto
map="M$types=benchagent/pb/types,M$delegated=benchagent/pb/delegatedidentity"
rm -rf "$out/src"
mkdir -p "$out/src/benchagent" "$out/bin"
protoc -I "$root/protos" --go_out="$out/src" --go_opt="$map" \
  --go-grpc_out="$out/src" --go-grpc_opt="$map" "$types" "$delegated"
cp "$root/benchmarks/goagent/main.go" "$out/src/benchagent/"
GO111MODULE=off GOPATH="$out:/usr/share/gocode" GOCACHE="$out/cache" \
  go build -o "$out/bin/goagent" benchagent
echo "$out/bin/goagent"

#!/bin/sh
# Fetch the console's third-party libraries from the npm registry (`make console-assets`).
# The files are committed: serving the console needs neither npm nor the network. To upgrade,
# change a version here, run this, check the console (tests/console), commit the result.
set -eu
HERE=$(cd "$(dirname "$0")" && pwd)
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT

# package@version  file-in-package  saved-as
set -- \
  htm@3.1.1 preact/standalone.module.js preact-htm.js \
  uplot@1.6.32 dist/uPlot.esm.js uplot.js \
  uplot@1.6.32 dist/uPlot.min.css uplot.css

: > "$TMP/VERSIONS"
while [ $# -gt 0 ]; do
  pkg=$1 file=$2 out=$3
  shift 3
  dir="$TMP/$(echo "$pkg" | tr '@/' '__')"
  if [ ! -d "$dir" ]; then
    mkdir -p "$dir"
    (cd "$dir" && npm pack --silent "$pkg" >/dev/null && tar xzf ./*.tgz)
    cp "$dir/package/LICENSE" "$HERE/LICENSE.${pkg%@*}"
    license=$(node -p "require('$dir/package/package.json').license")
    integrity=$(cd "$dir" && npm view "$pkg" dist.integrity)
    echo "$pkg $license $integrity" >> "$TMP/VERSIONS"
  fi
  cp "$dir/package/$file" "$HERE/$out"
  echo "$pkg $file -> $out"
done
# preact-htm.js bundles Preact: its licence travels with it.
(cd "$TMP" && mkdir preact && cd preact && npm pack --silent preact@10 >/dev/null && tar xzf ./*.tgz)
cp "$TMP/preact/package/LICENSE" "$HERE/LICENSE.preact"
{
  echo "# Third-party files in this folder: package@version, licence, npm integrity."
  echo "# preact-htm.js is htm's 'preact/standalone' build: htm (Apache-2.0) with Preact 10 (MIT)"
  echo "# and its hooks bundled in. Refetch with: make console-assets"
  cat "$TMP/VERSIONS"
} > "$HERE/VERSIONS"

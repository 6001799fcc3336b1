#!/bin/sh
# Place a build from the controller cache into ROOT/builds/ID, verified (gemma4-fleet).
#
# Usage: unpack_build.sh ROOT ID TARBALL OWNED
#   TARBALL     the uploaded build (tar.gz); TARBALL.sha256 holds the sha256 it must have
#   OWNED       the marker file prune.py looks for (it deletes only what this tool made)
# A tarball whose sha256 differs, or that does not hold a llama.cpp build, is deleted and
# nothing else changes: the build in service keeps serving. A good one is unpacked beside the
# builds and renamed into place.
set -eu
root=$1 id=$2 tmp=$3 owned=$4

want=$(cut -d" " -f1 <"$tmp.sha256")
got=$(sha256sum <"$tmp" | cut -d" " -f1)
if [ "$got" != "$want" ]; then
    rm -f "$tmp" "$tmp.sha256"
    echo "sha256 mismatch for $tmp: got $got, expected $want; builds unchanged" >&2
    exit 1
fi
stage="$root/builds/.$id.unpack"
rm -rf "$stage"
mkdir -p "$stage"
if ! tar -C "$stage" -xzf "$tmp" || [ ! -x "$stage/bin/llama-server" ] \
    || [ ! -f "$stage/BUILD-INFO" ]; then
    rm -rf "$stage" "$tmp" "$tmp.sha256"
    echo "$tmp is not a llama.cpp build; builds unchanged" >&2
    exit 1
fi
: >"$stage/$owned"
rm -f "$tmp" "$tmp.sha256"
rm -rf "${root:?}/builds/$id"
mv "$stage" "$root/builds/$id"

#!/bin/sh
# Build llama-server and llama-bench from ROOT/src into ROOT/builds/ID (gemma4-fleet).
#
# Usage: build.sh ROOT ID COMMIT OPTIONS JOBS CCACHE_DIR OWNED
#   OPTIONS     the CMake options, split on spaces and never globbed
#   JOBS        parallel compile jobs; empty: nproc
#   CCACHE_DIR  the compiler cache; empty: ccache's default
#   OWNED       the marker file prune.py looks for (it deletes only what this tool made)
# It compiles in a scratch folder (ROOT/build/ID) and renames only a finished build into place,
# so a failed build leaves the previous one, which the unit still points at, serving. The
# compiler writes to ROOT/build/ID.log (the deploy's progress lines come from its [n/m] lines);
# when it fails, the log's tail is shown.
set -euf
root=$1 id=$2 commit=$3 options=$4 jobs=${5:-$(nproc)} ccache=$6 owned=$7
[ -z "$ccache" ] || export CCACHE_DIR="$ccache"
# NVIDIA's installers put nvcc here without adding it to PATH.
export PATH="$PATH:/usr/local/cuda/bin"

mkdir -p "$root/build" "$root/builds"
scratch="$root/build/$id" stage="$root/builds/$id.partial" log="$root/build/$id.log"
fail() { tail -n 40 "$log"; exit 1; }
# shellcheck disable=SC2086  # one CMake option per word
cmake -S "$root/src" -B "$scratch" -G Ninja $options >"$log" 2>&1 || fail
cmake --build "$scratch" --target llama-server llama-bench -j "$jobs" >>"$log" 2>&1 || fail

rm -rf "$stage"
mkdir -p "$stage/bin"
: >"$stage/$owned"
cp "$scratch/bin/llama-server" "$scratch/bin/llama-bench" "$stage/bin/"
"$stage/bin/llama-server" --version >"$stage/VERSION" 2>&1
# Its options, for the flag check of every later run (no need to load the binary).
"$stage/bin/llama-server" --help >"$stage/bin/llama-server.help" 2>&1
printf 'commit=%s\nid=%s\noptions=%s\n' "$commit" "$id" "$options" >"$stage/BUILD-INFO"
rm -rf "${root:?}/builds/$id"
mv "$stage" "$root/builds/$id"
rm -rf "$scratch"

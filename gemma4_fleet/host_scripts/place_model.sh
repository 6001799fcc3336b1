#!/bin/sh
# Place a model file at DEST, verified by size and sha256 before it is moved there (gemma4-fleet).
#
# Usage: place_model.sh DEST SHA256 SIZE OWNED [URL]
#   SIZE        the expected size in bytes; empty: not checked (the sha256 always is)
#   OWNED       the marker file prune.py looks for (it deletes only what this tool made)
#   URL         download DEST.partial from here first, resuming a partial download (HTTP Range);
#               without it, DEST.partial was uploaded
# A file that does not match is deleted and the good file already at DEST (if any) stays. A
# download that stops keeps DEST.partial for the next run to resume, except on a write error
# (full disk), which deletes it. curl's progress meter goes to DEST.partial.progress, where the
# deploy reads its progress lines from. DEST.sha256 (sha256, size, mtime) is the stamp that
# saves re-hashing a large file on every run.
set -eu
dest=$1 want=$2 size=$3 owned=$4 url=${5:-}
tmp="$dest.partial"
dir=$(dirname "$dest")
mkdir -p "$dir"
: >"$dir/$owned"

fetch() {
    rc=0
    curl -fSL --retry 3 -C - -o "$tmp" "$url" 2>"$tmp.progress" || rc=$?
    [ "$rc" = 0 ] || grep -a "curl:" "$tmp.progress" >&2 || true
    rm -f "$tmp.progress"
    if [ "$rc" = 23 ]; then
        rm -f "$tmp"
        free=$(df -B1 --output=avail "$dir" | tail -n1 | tr -d " ")
        echo "cannot write $tmp (disk full? $free bytes free); the model in service is untouched" >&2
        exit 1
    elif [ "$rc" != 0 ]; then
        got=$(stat -c %s "$tmp" 2>/dev/null || echo 0)
        echo "download of $url stopped (curl exit $rc) at $got bytes; the next run resumes it" >&2
        exit 1
    fi
}

if [ -f "$dest" ] && [ "$(sha256sum <"$dest" | cut -d" " -f1)" = "$want" ]; then
    rm -f "$tmp"
else
    [ -z "$url" ] || fetch
    # A wrong size fails before hashing gigabytes.
    have=$(stat -c %s "$tmp")
    if [ -n "$size" ] && [ "$have" != "$size" ]; then
        rm -f "$tmp"
        echo "size mismatch for $dest: got $have bytes, expected $size" >&2
        exit 1
    fi
    got=$(sha256sum <"$tmp" | cut -d" " -f1)
    if [ "$got" != "$want" ]; then
        rm -f "$tmp"
        echo "sha256 mismatch for $dest: got $got, expected $want" >&2
        exit 1
    fi
    chmod 0644 "$tmp"
    mv -f "$tmp" "$dest"
fi
printf '%s %s\n' "$want" "$(stat -c "%s %Y" "$dest")" >"$dest.sha256"

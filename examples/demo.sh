#!/bin/sh
# The README's main job: store two example layers, mount the top, list its changes, export its
# diff and re-apply it.  Uses the default store (graphdriver --help says where); safe to re-run.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
gd=${GRAPHDRIVER:-graphdriver}

# Start over if an earlier run left the example layers behind.
for id in hello-copy hello hello-base; do
    if $gd exists "$id" 2>/dev/null; then
        while $gd ls --format '{{.ID}} {{.Mounts}}' | grep -qx "$id [1-9][0-9]*"; do
            $gd unmount "$id"
        done
        $gd rm "$id"
    fi
done

echo "imported $($gd import hello-base "$here/hello-base.tar.gz") bytes as hello-base"
$gd status
$gd create hello --parent hello-base
$gd --json apply hello "$here/hello-upper.tar.gz"
root=$($gd mount hello)
echo "hello is mounted at $root:"
ls -l "$root" "$root/etc" "$root/var/cache"
echo "changes of hello against hello-base:"
$gd changes hello
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
$gd diff hello -o "$tmp/hello.diff.tar"
$gd create hello-copy --parent hello-base
$gd apply hello-copy "$tmp/hello.diff.tar" >/dev/null
if [ "$($gd changes hello-copy)" = "$($gd changes hello)" ]; then
    echo "the exported diff re-applied on hello-base gives the same changes"
else
    echo "the re-applied diff differs" >&2
    exit 1
fi
$gd unmount hello
$gd ls
$gd ls --tree

#!/usr/bin/env bash
# Incremental backups with rsync hard links: each run creates a dated snapshot
# that shares unchanged files with the previous one, then prunes old snapshots.
#
#   backup.sh /home/me /mnt/backup/laptop [keep_days]
set -euo pipefail

src=${1:?usage: backup.sh SOURCE DEST [KEEP_DAYS]}
dest=${2:?usage: backup.sh SOURCE DEST [KEEP_DAYS]}
keep_days=${3:-30}
stamp=$(date +%Y-%m-%dT%H%M%S)
snapshot="$dest/$stamp"
latest="$dest/latest"
lock="$dest/.backup.lock"

log() { printf '%s %s\n' "$(date '+%F %T')" "$*"; }

mkdir -p "$dest"
exec 9>"$lock"
if ! flock -n 9; then
    log "another backup is running; exiting"
    exit 1
fi

# Remove a half-written snapshot if we are interrupted.
cleanup() {
    local rc=$?
    if [[ $rc -ne 0 && -d "$snapshot.partial" ]]; then
        log "backup failed (exit $rc); removing $snapshot.partial"
        rm -rf -- "$snapshot.partial"
    fi
}
trap cleanup EXIT

link_dest=()
if [[ -d "$latest" ]]; then
    link_dest=(--link-dest="$(readlink -f "$latest")")
fi

log "backing up $src to $snapshot"
rsync -a --delete --numeric-ids --info=stats1 \
    --exclude='.cache/' --exclude='node_modules/' --exclude='*.tmp' \
    "${link_dest[@]}" "$src/" "$snapshot.partial/"

mv -- "$snapshot.partial" "$snapshot"
ln -sfn -- "$snapshot" "$latest"
log "snapshot complete: $(du -sh -- "$snapshot" | cut -f1) (hard-linked files counted once)"

# Prune snapshots older than keep_days, never the one 'latest' points to.
current=$(readlink -f "$latest")
find "$dest" -mindepth 1 -maxdepth 1 -type d -name '20*' -mtime +"$keep_days" -print0 |
while IFS= read -r -d '' old; do
    if [[ "$(readlink -f "$old")" != "$current" ]]; then
        log "pruning $old"
        rm -rf -- "$old"
    fi
done
log "done"

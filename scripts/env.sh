# Sourced by the scripts: one cargo target directory outside the clone, shared by every run on
# this machine, so a second run rebuilds only what changed.
if [ -z "${CARGO_TARGET_DIR:-}" ]; then
  if [ -w /var/cache ] ; then
    export CARGO_TARGET_DIR=/var/cache/continuum-target
  else
    export CARGO_TARGET_DIR="${XDG_CACHE_HOME:-$HOME/.cache}/continuum-target"
  fi
fi
mkdir -p "$CARGO_TARGET_DIR"

#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: every worker (host) runs the same command, and JAX
# discovers the other workers itself (starflow-jax train calls jax.distributed.initialize()
# without arguments on a TPU VM). Run this from a machine with gcloud and this checkout.
#
#   export TPU_NAME=my-v5p-64 ZONE=us-east5-a            # PROJECT=... optional
#   bash launch/tpu_pod.sh setup                          # code + venv on every worker
#   bash launch/tpu_pod.sh check                          # processes and devices seen by JAX
#   bash launch/tpu_pod.sh train CONFIG WORKDIR [train flags...]
#   bash launch/tpu_pod.sh exec 'COMMAND'                 # any command on every worker
#
# WORKDIR must be one place that every worker sees: a gs://bucket/run URL (checkpoints
# through orbax/TensorStore, the rest through etils.epath + gcsfs, which setup installs
# (the gcs extra); such a workdir is not locked, so start one run per workdir), or a
# Filestore/NFS mount at the same path on each worker: orbax writes each checkpoint from
# all processes together.
#
# Environment:
#   TPU_NAME, ZONE   the TPU VM (required); PROJECT: gcloud project (optional)
#   REMOTE_DIR       the checkout on the workers (default: starflow-jax, in the home dir)
#   REPO_URL, REF    setup clones REPO_URL at REF on every worker; without REPO_URL it
#                    copies this checkout (tracked and untracked, not ignored, files)
#   PYTHON           the workers' Python (default python3; 3.10+)
#   DETACH=1         train in the background on every worker (nohup), each writing
#                    REMOTE_DIR/train_<worker host>.log; otherwise the output streams here
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
: "${TPU_NAME:?set TPU_NAME (the TPU VM name)}"
: "${ZONE:?set ZONE (the TPU VM zone)}"
REMOTE_DIR=${REMOTE_DIR:-starflow-jax}
PYTHON=${PYTHON:-python3}
GCLOUD_ARGS=(--zone "$ZONE")
if [[ -n ${PROJECT:-} ]]; then GCLOUD_ARGS+=(--project "$PROJECT"); fi

# The JAX version range pinned by pyproject.toml (e.g. ">=0.10,<0.12"), so that
# jax[tpu] (JAX + the matching libtpu from PyPI) is one the project supports.
JAX_SPEC=$(sed -n 's/^ *"jax\([<>=!~][^"]*\)",*$/\1/p' "$HERE/pyproject.toml" | head -n1)
[[ -n $JAX_SPEC ]] || { echo "cannot read the jax requirement from pyproject.toml" >&2; exit 1; }

on_all_workers() {  # run one shell command on every worker at once
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${GCLOUD_ARGS[@]}" --worker=all --command "$1"
}

cmd=${1:-}
shift || true
case $cmd in
  setup)
    if [[ -n ${REPO_URL:-} ]]; then
      on_all_workers "set -e; if [ -d $REMOTE_DIR/.git ]; then git -C $REMOTE_DIR fetch -q origin;
        else git clone -q $(printf %q "$REPO_URL") $REMOTE_DIR; fi; git -C $REMOTE_DIR checkout -q $(printf %q "${REF:-HEAD}")"
    else
      tarball="$(mktemp -d)/starflow-jax.tgz"
      (cd "$HERE" && git ls-files -z --cached --others --exclude-standard | tar czf "$tarball" --null -T -)
      gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:starflow-jax.tgz" "${GCLOUD_ARGS[@]}" --worker=all
      rm -rf "$(dirname "$tarball")"
      on_all_workers "set -e; mkdir -p $REMOTE_DIR && tar xzf starflow-jax.tgz -C $REMOTE_DIR && rm starflow-jax.tgz"
    fi
    # One pip call, so that the resolver picks a jax[tpu] inside the project's range.
    on_all_workers "set -e; cd $REMOTE_DIR; $PYTHON -m venv .venv; . .venv/bin/activate;
      pip install -q -U pip; pip install -q -e '.[gcs]' $(printf %q "jax[tpu]$JAX_SPEC")"
    ;;
  check)
    on_all_workers "cd $REMOTE_DIR && . .venv/bin/activate && python -c '
from starflow_jax.parallel import distributed
info = distributed.initialize()
import jax
print(f\"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local devices, \"
      f\"{jax.device_count()} in all ({jax.devices()[0].device_kind})\")'"
    ;;
  train)
    [[ $# -ge 2 ]] || { echo "usage: $0 train CONFIG WORKDIR [train flags...]" >&2; exit 2; }
    config=$1 workdir=$2
    shift 2
    # Quoted for the remote shell; the same command on every worker.
    run="cd $REMOTE_DIR && . .venv/bin/activate && exec starflow-jax train --config $(printf %q "$config")"
    run+=" --workdir $(printf %q "$workdir")"
    if (($#)); then run+=" $(printf '%q ' "$@")"; fi
    if [[ ${DETACH:-0} == 1 ]]; then
      on_all_workers "nohup bash -c $(printf %q "$run") > $REMOTE_DIR/train_\$(hostname).log 2>&1 < /dev/null &"
      echo "started on every worker; follow with: $0 exec 'tail -n 5 $REMOTE_DIR/train_*.log'"
    else
      on_all_workers "$run"
    fi
    ;;
  exec)
    [[ $# -eq 1 ]] || { echo "usage: $0 exec 'COMMAND'" >&2; exit 2; }
    on_all_workers "$1"
    ;;
  *)
    sed -n '2,28p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

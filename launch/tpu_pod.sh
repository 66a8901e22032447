#!/usr/bin/env bash
# Run the trainer on every worker of a Cloud TPU VM (a pod slice or a single host).
#
# Usage:
#   launch/tpu_pod.sh [--setup] TPU_NAME ZONE [TRAIN ARGUMENTS ...]
#
#   # once per TPU VM: copy this checkout's HEAD to every worker and install it
#   launch/tpu_pod.sh --setup my-v5p-64 us-east5-a
#   # then, from a tmux/screen session (the trainers stop if this ssh session ends):
#   launch/tpu_pod.sh my-v5p-64 us-east5-a --config configs/sd3_ctcal.py \
#       --workdir /mnt/gcs/runs/sd3_ctcal --config.data.path=/mnt/gcs/data/sd3-1024 \
#       --config.compilation_cache_dir=gs://BUCKET/xla-cache
#
# Every worker runs the same `python -m ctcal_jax.train --multihost TRAIN ARGUMENTS` (through
# `gcloud compute tpus tpu-vm ssh --worker=all`); `jax.distributed.initialize()` finds the other
# workers itself, and each worker reads its own share of the data (ctcal_jax/data/loader.py).
# Re-running the same command resumes the run from --workdir's last checkpoint.
#
# --workdir and data.path must be the same shared files on every worker: a bucket mounted with
# gcsfuse or a Filestore/NFS mount (/mnt/...). The trainer writes through the local file system, so a
# gs:// --workdir is refused here; the compilation cache (`--config.compilation_cache_dir`) may be a
# gs:// path (JAX writes it itself).
#
# --setup copies `git archive HEAD` of this checkout (commit what you want to run) to
# ~/$CTCAL_DIR on every worker, makes a virtual environment there with $CTCAL_PYTHON and installs
# `pip install -c <requirements.lock without hashes> -e '.[tpu]'`: the lock's versions of every
# package it pins, plus libtpu, which the (CPU) lock does not pin. The lock is for Python 3.11.
# With --setup and no train arguments it stops after the install.
#
# Environment:
#   CTCAL_DIR          directory under the workers' home (default ctcal_jax)
#   CTCAL_PYTHON       interpreter that makes the venv on the workers (default python3.11)
#   CTCAL_REMOTE_ENV   extra VAR=value words put before the trainer (e.g. "HF_HOME=/mnt/gcs/hf")
#   GCLOUD_ARGS        extra arguments for every gcloud call (e.g. "--project P --internal-ip")
set -euo pipefail

usage() { sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"; exit "${1:-0}"; }

setup=0
if [[ "${1:-}" == "--setup" ]]; then setup=1; shift; fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then usage 0; fi
if (( $# < 2 )); then usage 2 >&2; fi
name=$1 zone=$2
shift 2

dir=${CTCAL_DIR:-ctcal_jax}
python=${CTCAL_PYTHON:-python3.11}
read -r -a gcloud_args <<< "${GCLOUD_ARGS:-}"
read -r -a remote_env <<< "${CTCAL_REMOTE_ENV:-}"
# ${a[@]+"${a[@]}"}: an empty array under `set -u` on macOS's bash 3.2 too.

on_all_workers() {  # a bash command line, run on every worker at once
  gcloud compute tpus tpu-vm ssh "$name" --zone "$zone" --worker=all ${gcloud_args[@]+"${gcloud_args[@]}"} \
    --command "$1"
}

if (( setup )); then
  root=$(git -C "$(dirname "$0")/.." rev-parse --show-toplevel)
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  git -C "$root" archive --format=tar.gz -o "$tmp/ctcal_jax.tar.gz" HEAD
  echo "copying $(git -C "$root" rev-parse --short HEAD) of $root to ~/$dir on every worker of $name"
  gcloud compute tpus tpu-vm scp "$tmp/ctcal_jax.tar.gz" "$name:ctcal_jax.tar.gz" --zone "$zone" --worker=all \
    ${gcloud_args[@]+"${gcloud_args[@]}"}
  qdir=$(printf '%q' "$dir") qpython=$(printf '%q' "$python")
  # The lock pins with hashes; hashes in a constraints file put pip in hash-checking mode, which
  # refuses the editable install and libtpu (not in the lock), so the pins go in without them. The
  # last line starts JAX on every worker at once (as a pod needs) and prints what each one sees.
  on_all_workers "set -euo pipefail
    rm -rf ~/$qdir && mkdir -p ~/$qdir && cd ~/$qdir
    tar -xzf ~/ctcal_jax.tar.gz && rm ~/ctcal_jax.tar.gz
    $qpython -c 'import sys; assert sys.version_info[:2] == (3, 11), sys.version' \\
      || { echo 'requirements.lock is for Python 3.11: set CTCAL_PYTHON to one' >&2; exit 1; }
    $qpython -m venv .venv
    sed -n 's/^\\([A-Za-z0-9_.-]*==[^ ]*\\).*/\\1/p' requirements.lock > constraints.txt
    .venv/bin/python -m pip install --quiet --upgrade pip
    .venv/bin/python -m pip install --quiet -c constraints.txt -e '.[tpu]'
    .venv/bin/python -c 'import jax; print(jax.process_index(), jax.local_device_count(), jax.device_count(), jax.devices()[0].device_kind)'"
  (( $# )) || exit 0
fi

(( $# )) || { echo "no train arguments (--config ... --workdir ...)" >&2; exit 2; }
args=("$@")
for i in "${!args[@]}"; do
  if [[ "${args[i]}" == --workdir=gs://* || ( "${args[i]}" == --workdir && "${args[i + 1]:-}" == gs://* ) ]]; then
    echo "--workdir gs://...: the trainer writes through the file system; mount the bucket (gcsfuse) on every worker" >&2
    exit 2
  fi
done

on_all_workers "cd ~/$(printf '%q' "$dir") && $(printf '%q ' env ${remote_env[@]+"${remote_env[@]}"}) \
.venv/bin/python -m ctcal_jax.train --multihost $(printf '%q ' "$@")"

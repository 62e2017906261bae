#!/usr/bin/env bash
# Train on a Cloud TPU VM slice (one or many hosts) with gcloud.
#
# Usage (run from the repository root; NAME and ZONE name the TPU VM):
#   launch/tpu_vm.sh create NAME ZONE v5litepod-16 [RUNTIME_VERSION]   # gcloud compute tpus tpu-vm create
#   launch/tpu_vm.sh setup  NAME ZONE                 # copy this checkout to every worker, install it (jax[tpu])
#   launch/tpu_vm.sh sync   NAME ZONE                 # copy the code again after local edits (no reinstall)
#   launch/tpu_vm.sh run    NAME ZONE WORKDIR -- --config=configs/mgca.py --config.train.batch_size=1024
#                                                     # launch/pretrain.py on all workers at once, in the background
#   launch/tpu_vm.sh status NAME ZONE                 # last log lines of every worker
#   launch/tpu_vm.sh logs   NAME ZONE [DEST]          # copy every worker's log to DEST (default runs/tpu_logs/NAME)
#   launch/tpu_vm.sh stop   NAME ZONE                 # SIGTERM on every worker: checkpoint, then exit 0
#   launch/tpu_vm.sh delete NAME ZONE
#
# Environment: PROJECT (gcloud project; default: gcloud's), DATA_CMD (optional shell command run on every
# worker before training, e.g. to copy prepared shards from a bucket: "gsutil -m rsync -r gs://b/mimic ~/data").
#
# How it works. `run` starts the same command on every worker (`--worker=all`) with MEDVLP_DISTRIBUTED=auto,
# so medvlp_jax/app.py calls jax.distributed.initialize(), which finds the slice's coordinator and the
# process ids from the TPU metadata. Each worker reads its own shard files (config.data.num_streams) and
# logs to ~/medvlp_logs/<hostname>.log; only process 0 logs progress and writes metrics.
# WORKDIR must be one directory that every worker sees (checkpoints are written by all processes together
# and restored by all): a Filestore/NFS mount or a gcsfuse-mounted bucket mounted at the same path on every
# worker (e.g. DATA_CMD="mkdir -p /tmp/gcs && gcsfuse --implicit-dirs my-bucket /tmp/gcs"). Rerunning `run`
# with the same WORKDIR resumes from the latest checkpoint; `stop` (or a preemption) saves one first.
set -euo pipefail

cmd=${1:-}; name=${2:-}; zone=${3:-}
if [[ -z "$cmd" || -z "$name" || -z "$zone" ]]; then
  sed -n '2,28p' "$0"; exit 2
fi
shift 3
project_flag=()
[[ -n "${PROJECT:-}" ]] && project_flag=(--project="$PROJECT")
remote_dir="medvlp_jax"
jax_version=$(python3 -c "import re;print(re.search(r'jax>=([0-9.]+)', open('setup.cfg').read()).group(1))" 2>/dev/null || echo "0.10.2")

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$zone" "${project_flag[@]}"; }
on_all() { tpu ssh "$name" --worker=all --command="$1"; }

copy_code() {
  local tarball
  tarball=$(mktemp /tmp/medvlp_jax.XXXXXX.tar.gz)
  # The tracked files plus untracked, non-ignored ones (what the next commit would hold); no data, runs, venv.
  git ls-files -co --exclude-standard -z | tar --null -czf "$tarball" -T -
  tpu scp "$tarball" "$name":medvlp_jax.tar.gz --worker=all
  on_all "mkdir -p ~/$remote_dir && tar -xzf ~/medvlp_jax.tar.gz -C ~/$remote_dir && rm ~/medvlp_jax.tar.gz"
  rm -f "$tarball"
}

case "$cmd" in
  create)
    accel=${1:?accelerator type, e.g. v4-32, v5litepod-16, v5p-16, v6e-8}
    version=${2:-tpu-ubuntu2204-base}
    tpu create "$name" --accelerator-type="$accel" --version="$version"
    ;;
  setup)
    copy_code
    on_all "cd ~/$remote_dir && python3 -m pip install -q -U pip && \
            python3 -m pip install -q -e . 'jax[tpu]==$jax_version' \
              -f https://storage.googleapis.com/jax-releases/libtpu_releases.html && \
            python3 -c 'import jax; print(jax.process_count(), jax.device_count(), jax.devices()[0].device_kind)'"
    ;;
  sync)
    copy_code
    ;;
  run)
    workdir=${1:?WORKDIR (a directory every worker shares)}; shift
    [[ "${1:-}" == "--" ]] && shift
    args=$(printf ' %q' "$@")
    prep=${DATA_CMD:-true}
    # setsid + nohup: the training survives the ssh session; each worker logs to its own file.
    on_all "mkdir -p ~/medvlp_logs && cd ~/$remote_dir && ($prep) && \
            MEDVLP_DISTRIBUTED=auto TF_CPP_MIN_LOG_LEVEL=2 setsid nohup python3 launch/pretrain.py \
              --workdir=$(printf '%q' "$workdir")$args > ~/medvlp_logs/\$(hostname).log 2>&1 < /dev/null &"
    echo "started on all workers; follow with: $0 status $name $zone"
    ;;
  status)
    on_all 'echo "== $(hostname)"; tail -n 3 ~/medvlp_logs/*.log 2>/dev/null || echo "(no log yet)"'
    ;;
  logs)
    dest=${1:-runs/tpu_logs/$name}
    mkdir -p "$dest"
    n=$(tpu describe "$name" --format="value(networkEndpoints[].ipAddress)" | tr ';,' '\n\n' | grep -c . || true)
    for ((w = 0; w < ${n:-1}; w++)); do
      tpu scp "$name":"medvlp_logs/*.log" "$dest/" --worker="$w" || echo "worker $w: no logs"
    done
    echo "logs in $dest"
    ;;
  stop)
    # SIGTERM makes every process agree on a step, save a checkpoint there and exit 0 (train/faults.py).
    on_all "pkill -TERM -f 'launch/pretrain.py' || true"
    ;;
  delete)
    tpu delete "$name" --quiet
    ;;
  *)
    echo "unknown command $cmd"; sed -n '2,28p' "$0"; exit 2
    ;;
esac

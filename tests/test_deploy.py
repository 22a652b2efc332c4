"""deploy/: the cluster config passes the checks `ray up` runs, the RayJob manifest names what KubeRay
needs, and both run the one entry point the README documents, whose params the pipeline accepts."""

import re
import subprocess
from pathlib import Path

import pytest
import yaml

from pipeline.config import from_dict

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
ENTRY = "bash /app/deploy/repro-on-cluster.sh"


def _cluster() -> dict:
    return yaml.safe_load((DEPLOY / "ray-cluster.aws.yaml").read_text())


def _rayjob() -> dict:
    return yaml.safe_load((DEPLOY / "rayjob.yaml").read_text())


def test_cluster_config_passes_rays_own_validation():
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(_cluster()))  # what `ray up` does before it launches anything
    bad = _cluster()
    bad["available_node_types"]["a100_8x"]["min_wrkers"] = 2  # a typo must not pass
    with pytest.raises(Exception, match="min_wrkers"):
        validate_config(prepare_config(bad))


def test_cluster_has_a_cpu_head_and_8_gpu_a100_workers():
    cfg = _cluster()
    nodes = cfg["available_node_types"]
    head = nodes[cfg["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    (worker,) = [n for name, n in nodes.items() if name != cfg["head_node_type"]]
    assert worker["resources"]["GPU"] == 8 and worker["resources"]["accelerator_type:A100"] == 8
    assert worker["min_workers"] == worker["max_workers"] == cfg["max_workers"] == 2
    assert any("--num-gpus=0" in c for c in cfg["head_start_ray_commands"])


def test_rayjob_manifest_names_the_fields():
    job = _rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"] == ENTRY
    assert spec["shutdownAfterJobFinishes"] is True and int(spec["ttlSecondsAfterFinished"]) > 0
    env = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    assert env["IJEPA_STORAGE"].startswith("s3://")
    cluster = spec["rayClusterSpec"]
    (head,) = cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    (worker,) = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "8" and group["replicas"] == 2
    assert cluster["rayVersion"] == __import__("ray").__version__  # the Ray the image installs


def test_one_image_and_one_entry_point_everywhere():
    images = {_cluster()["docker"]["image"]}
    spec = _rayjob()["spec"]["rayClusterSpec"]
    for c in [*spec["headGroupSpec"]["template"]["spec"]["containers"],
              *[c for g in spec["workerGroupSpecs"] for c in g["template"]["spec"]["containers"]]]:
        images.add(c["image"])
    assert len(images) == 1
    assert ENTRY in (ROOT / "README.md").read_text() and ENTRY in (DEPLOY / "ray-cluster.aws.yaml").read_text()
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "WORKDIR /app" in dockerfile and "-c constraints.txt" in dockerfile


def test_entry_point_sets_params_the_pipeline_accepts():
    script = DEPLOY / "repro-on-cluster.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    env = {"IJEPA_STORAGE": "s3://bucket/prefix", "IJEPA_WORKERS": "16", "MLFLOW_TRACKING_URI": "http://m:5000"}
    text = "\n".join(line for line in script.read_text().splitlines() if not line.lstrip().startswith("#"))
    for var, value in env.items():  # ${VAR} and ${VAR:-default} as bash would expand them here
        text = re.sub(r"\$\{" + var + r"(:-[^}]*)?\}", value, text)
    sets = dict(s.split("=", 1) for s in re.findall(r'-S "?([a-z_.]+=[^"\s)]+)', text))
    assert {"preset", "ray.address", "ray.use_gpu", "ray.num_workers", "ray.accelerator_type",
            "ray.storage_path", "mlflow.tracking_uri"} <= set(sets)
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    for dotted, value in sets.items():
        *parents, leaf = dotted.split(".")
        node = raw
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value)
    cfg = from_dict(raw)  # a bad key or value would raise ConfigError here
    assert cfg.model.name == "vit_huge" and cfg.ray.num_workers == 16 and cfg.ray.use_gpu
    assert cfg.ray.address == "auto" and cfg.ray.storage_path == "s3://bucket/prefix/ray_results"


def test_entry_point_runs_dvc_exp_run_with_them(tmp_path):
    """The script itself, with `dvc` replaced by a stand-in that prints what it was given."""
    (tmp_path / "dvc").write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@"\n')
    (tmp_path / "dvc").chmod(0o755)
    env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "IJEPA_STORAGE": "s3://b/p"}
    out = subprocess.run(["bash", str(DEPLOY / "repro-on-cluster.sh"), "-S", "data.source=real"], env=env,
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[:3] == ["exp", "run", "report"] and out[3] == "pictures"  # as `make repro`
    assert "ray.storage_path=s3://b/p/ray_results" in out and out[-2:] == ["-S", "data.source=real"]
    assert not any(a.startswith("mlflow.tracking_uri") for a in out)  # only when MLFLOW_TRACKING_URI is set
    missing = subprocess.run(["bash", str(DEPLOY / "repro-on-cluster.sh")], env={"PATH": env["PATH"]},
                             capture_output=True, text=True)
    assert missing.returncode != 0 and "IJEPA_STORAGE" in missing.stderr

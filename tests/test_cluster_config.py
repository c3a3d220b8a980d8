"""The cluster files validated by Ray's own code: the launcher config (prepare_config +
validate_config), the RayService's serveConfigV2 (Serve's deploy schema and our AppArgs), the
RayJob's entrypoint (the fine-tuning job's own argument parser), the PVC and the Dockerfile."""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import ray
import yaml
from ray.serve.schema import ServeDeploySchema

from deployments.exposure import is_loopback
from deployments.sdsat import AppArgs

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROOT = "/home/ray/sdsat"  # where cluster/Dockerfile puts the repository
GPU_FAMILIES = ("g5.", "g6.", "g6e.", "p4d.", "p4de.", "p5.", "p5e.", "p5en.")


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def containers(pod_groups: list[dict]) -> list[dict]:
    return [c for group in pod_groups for c in group["template"]["spec"]["containers"]]


def gpus(container: dict) -> int:
    return int(container["resources"]["limits"].get("nvidia.com/gpu", 0))


# ---- ray up ----------------------------------------------------------------------------------


def test_launcher_config_passes_rays_own_validation_and_has_gpu_workers():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(load("ray_config.yaml"))
    validate_config(config)
    types = config["available_node_types"]
    gpu_types = [t for name, t in types.items() if name != config["head_node_type"]
                 and t["node_config"]["InstanceType"].startswith(GPU_FAMILIES)]
    assert gpu_types and all(t["min_workers"] == 0 for t in gpu_types)  # GPU nodes only while work needs them
    assert not types[config["head_node_type"]]["node_config"]["InstanceType"].startswith(GPU_FAMILIES)
    assert all("deeplearning" in t["node_config"]["ImageId"] for t in types.values())  # AMI with the NVIDIA driver


def test_launcher_uses_the_ray_gpu_image_of_the_installed_ray_with_token_auth_and_a_private_dashboard():
    config = load("ray_config.yaml")
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    assert "--gpus all" in config["docker"]["worker_run_options"]
    head = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head and "0.0.0.0" not in head
    for command in config["head_start_ray_commands"][1:] + config["worker_start_ray_commands"][1:]:
        assert "RAY_AUTH_MODE=token" in command and "RAY_AUTH_TOKEN_PATH=/home/ray/ray_auth_token" in command
    assert config["file_mounts"]["/home/ray/ray_auth_token"] == "~/.ray/auth_token"


# ---- KubeRay --------------------------------------------------------------------------------


def test_rayservice_serve_config_passes_serves_schema_and_the_app_args():
    service = load("cluster/kuberay.yaml")
    assert service["kind"] == "RayService"
    serve_config = ServeDeploySchema.model_validate(yaml.safe_load(service["spec"]["serveConfigV2"]))
    (app,) = serve_config.applications
    assert app.import_path == "deployments.sdsat:build_app"
    args = AppArgs.model_validate(app.args)
    assert args.gpus_per_replica == 1
    assert not args.allow_unauthenticated and args.api_key is None  # the key comes from a Secret, never the file
    assert not is_loopback(serve_config.http_options.host)  # so the app demands the key

    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["rayVersion"] == ray.__version__
    assert cluster["enableInTreeAutoscaling"] is True  # GPU pods follow Serve's replica count
    assert cluster["authOptions"]["mode"] == "token"
    (workers,) = cluster["workerGroupSpecs"]
    per_pod = gpus(containers([workers])[0])
    assert per_pod >= 1 and workers["maxReplicas"] * per_pod >= args.max_replicas * args.gpus_per_replica
    for container in containers([cluster["headGroupSpec"], workers]):
        env = {e["name"]: e for e in container["env"]}
        assert env["SDSAT_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "sdsat-api-key"


def test_rayjob_runs_the_finetuning_job_with_a_config_it_parses():
    from sdsat.training.config import parse_args

    job = load("cluster/finetune/rayjob.yaml")
    assert job["kind"] == "RayJob" and job["spec"]["shutdownAfterJobFinishes"] is True
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:2] == ["python", f"{IMAGE_ROOT}/jobs/finetune.py"]
    argv = [a.replace(IMAGE_ROOT, str(ROOT)) for a in argv[2:]]
    cfg, _ = parse_args(argv)
    assert cfg.storage_path.startswith("/mnt/shared/") and cfg.export_dir.startswith("/mnt/shared/")
    cluster = job["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    (workers,) = cluster["workerGroupSpecs"]
    (worker,) = containers([workers])
    assert cfg.use_gpu and workers["replicas"] * gpus(worker) == cfg.num_workers  # one GPU per Ray Train worker
    assert int(worker["resources"]["limits"]["cpu"]) >= cfg.cpus_per_worker
    # The RayService serves what the job exports.
    served = yaml.safe_load(load("cluster/kuberay.yaml")["spec"]["serveConfigV2"])["applications"][0]["args"]["model"]
    assert served == cfg.export_dir


@pytest.mark.parametrize("manifest, spec_key", [("cluster/kuberay.yaml", "rayClusterConfig"),
                                                ("cluster/finetune/rayjob.yaml", "rayClusterSpec")])
def test_pods_mount_the_shared_claim_and_run_the_sdsat_image(manifest, spec_key):
    pvc = load("cluster/pvc.yaml")
    assert pvc["kind"] == "PersistentVolumeClaim" and pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cluster = load(manifest)["spec"][spec_key]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        volumes = {v["name"]: v for v in group["template"]["spec"]["volumes"]}
        assert volumes["shared"]["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]
    for container in containers(groups):
        assert container["image"] == "sdsat:latest"
        assert {"name": "shared", "mountPath": "/mnt/shared"} in container["volumeMounts"]


def test_dockerfile_builds_on_the_ray_gpu_image_and_installs_the_pinned_repo():
    lines = [line.strip() for line in (ROOT / "cluster" / "Dockerfile").read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == f"FROM {load('ray_config.yaml')['docker']['image']}"
    copied = {s for i in instructions if i.startswith("COPY") for s in i.split()[1:-1] if not s.startswith("--")}
    assert {"sdsat", "deployments", "jobs", "configs", "pyproject.toml", "README.md"} <= copied
    assert any(i.startswith("RUN pip install") and " -e ." in i for i in instructions)
    assert "torch==" in (ROOT / "pyproject.toml").read_text()  # the install pins torch
    assert f"WORKDIR {IMAGE_ROOT}" in instructions and f"ENV PYTHONPATH={IMAGE_ROOT}" in instructions
    assert all((ROOT / name).exists() for name in copied)


# ---- Serve configs ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["configs/serve_default.yaml", "configs/serve_cluster.yaml"])
def test_serve_configs_are_valid_and_never_open_without_a_key(path):
    config = ServeDeploySchema.model_validate(load(path))
    for app in config.applications:
        args = AppArgs.model_validate(app.args)
        assert not args.allow_unauthenticated and args.api_key is None  # no key committed, no opt-out shipped
    if path.endswith("default.yaml"):
        assert is_loopback(config.http_options.host) and args.gpus_per_replica == 0
    else:
        assert args.gpus_per_replica == 1

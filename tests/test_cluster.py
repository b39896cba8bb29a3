"""The cluster configs: validated offline with Ray's own code, and autoscaling shown
for real on this machine with Ray's fake multi-node provider."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray_processes import free_port, kill_session, session_pids

CLUSTER_DIR = Path(__file__).resolve().parent.parent / "cluster"


def load_yaml(name: str) -> dict:
    return yaml.safe_load((CLUSTER_DIR / name).read_text())


# ---- cluster/config.yaml: the AWS cluster launcher config ----------------------------


@pytest.fixture
def offline(monkeypatch):
    """Any import of the AWS SDK fails: proves nothing below needs AWS, credentials
    or network (the AWS provider only imports boto3 when bootstrapping a real cluster)."""
    for module in ("boto3", "botocore"):
        monkeypatch.setitem(sys.modules, module, None)


def prepared_launcher_config() -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    # prepare_config merges ray/autoscaler/aws/defaults.yaml (a file in the wheel),
    # merges setup commands and fills per-type min/max workers; it never calls the
    # provider's bootstrap_config, which is the part that talks to AWS.
    prepared = prepare_config(load_yaml("config.yaml"))
    validate_config(prepared)
    return prepared


def test_launcher_config_passes_rays_validator_offline(offline):
    prepared = prepared_launcher_config()
    assert prepared["provider"]["type"] == "aws"
    assert prepared["head_node_type"] in prepared["available_node_types"]


def test_validator_rejects_a_broken_launcher_config(offline):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = load_yaml("config.yaml")
    broken["available_node_types"]["ray.worker.gpu"]["resources"] = "GPU: 1"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(broken))


def test_launcher_config_facts(offline):
    config = prepared_launcher_config()
    node_types = config["available_node_types"]
    head = node_types[config["head_node_type"]]
    assert head.get("resources", {}).get("GPU", 0) == 0
    assert head["max_workers"] == 0
    assert not head["node_config"]["InstanceType"].startswith(("g", "p"))

    workers = {name: t for name, t in node_types.items() if name != config["head_node_type"]}
    gpu_workers = {name: t for name, t in workers.items() if t["resources"].get("GPU", 0) >= 1}
    assert "ray.worker.gpu" in gpu_workers
    for node_type in gpu_workers.values():
        assert node_type["min_workers"] == 0  # no GPU bill while nothing trains
        assert node_type["max_workers"] >= 1
        assert node_type["node_config"]["InstanceType"].startswith(("g", "p"))
    spot = node_types["ray.worker.gpu_spot"]["node_config"]["InstanceMarketOptions"]
    assert spot["MarketType"] == "spot"
    assert 0 < config["idle_timeout_minutes"] <= 60
    assert config["max_workers"] >= max(t["max_workers"] for t in gpu_workers.values())

    # The project travels with file_mounts and is installed on every node, after a
    # torch build chosen for the node (CUDA where there is a GPU).
    assert config["file_mounts"] == {"~/agnews": "."}
    for commands in (config["head_setup_commands"], config["worker_setup_commands"]):
        text = "\n".join(commands)
        assert "pip install -q -e ~/agnews" in text
        assert "torch==2.13.0" in text and "download.pytorch.org/whl/$TORCH_CUDA" in text
        assert text.index("torch==2.13.0") < text.index("-e ~/agnews")

    # Dashboard on localhost only; the security group opens nothing beyond Ray's SSH.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in head_start
    every_command = json.dumps(
        [config[k] for k in ("head_start_ray_commands", "worker_start_ray_commands")]
    )
    assert "0.0.0.0" not in every_command
    assert "IpPermissions" not in config["provider"].get("security_group", {})
    assert "--address=$RAY_HEAD_IP:6379" in " ".join(config["worker_start_ray_commands"])


def test_fake_autoscaling_config_is_complete_and_valid():
    from ray.autoscaler._private.util import validate_config

    # Validated as is: prepare_config would merge fake_multi_node/example.yaml, which
    # the wheel does not ship; the autoscaler itself reads the YAML unprepared.
    config = load_yaml("fake_autoscaling.yaml")
    validate_config(config)
    assert config["provider"]["type"] == "fake_multinode"
    assert config["head_node_type"] == "ray.head.default"  # hard-coded by the provider
    worker = config["available_node_types"]["ray.worker.cpu"]
    assert worker["min_workers"] == 0 and worker["max_workers"] >= 2


# ---- cluster/rayjob.yaml: KubeRay -------------------------------------------------------


def test_rayjob_has_what_kuberay_needs():
    job = load_yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1"
    assert job["kind"] == "RayJob"
    assert job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python jobs/train.py ")
    assert "--data " in spec["entrypoint"] and "--out " in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert isinstance(runtime_env, dict) and runtime_env["working_dir"]

    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict)
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # K8s wants strings
    head_containers = head["template"]["spec"]["containers"]
    assert head_containers and all(c["name"] and c["image"] for c in head_containers)

    groups = cluster["workerGroupSpecs"]
    assert groups
    names = [g["groupName"] for g in groups]
    assert len(set(names)) == len(names)
    gpu_groups = []
    for group in groups:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert isinstance(group["rayStartParams"], dict)
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["name"] and c["image"] for c in containers)
        if any(int(c["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1 for c in containers):
            gpu_groups.append(group)
    assert gpu_groups
    assert all(g["minReplicas"] == 0 and g["maxReplicas"] >= 1 for g in gpu_groups)


# ---- autoscaling for real: the fake multi-node provider --------------------------------

# Runs in a subprocess: the pytest process may already hold an in-process Ray session
# (tests/conftest.py), and one process cannot be a driver of two clusters.
DRIVER = r"""
import json, sys, time
import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

def alive():
    return [n for n in ray.nodes() if n["Alive"]]

ray.init(address=sys.argv[1], log_to_driver=False)
result = {"alive_before": [n["NodeID"] for n in alive()]}

# Two bundles of 2 CPUs on distinct nodes: the 1-CPU head fits neither, so only
# two new worker nodes can satisfy it.
group = placement_group([{"CPU": 2}, {"CPU": 2}], strategy="STRICT_SPREAD")
ray.get(group.ready(), timeout=240)

@ray.remote(num_cpus=2)
def node_of_task():
    return ray.get_runtime_context().get_node_id()

result["task_nodes"] = ray.get(
    [
        node_of_task.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(group, i)
        ).remote()
        for i in range(2)
    ],
    timeout=120,
)
result["alive_peak"] = {n["NodeID"]: n["Resources"].get("CPU", 0) for n in alive()}
remove_placement_group(group)

# Work is over: idle workers must go after idle_timeout_minutes.
deadline = time.monotonic() + 240
while len(alive()) > 1 and time.monotonic() < deadline:
    time.sleep(1)
result["alive_after"] = [n["NodeID"] for n in alive()]
print("RESULT " + json.dumps(result), flush=True)
"""


def log_tail(temp_dir: str, pattern: str, chars: int = 3000) -> str:
    logs = sorted(Path(temp_dir).glob(f"session_latest/logs/{pattern}"))
    return "".join(f"--- {p.name}\n{p.read_text(errors='replace')[-chars:]}" for p in logs)


@pytest.mark.slow
def test_fake_cluster_scales_workers_up_and_down():
    import ray._private.services

    node_ip = ray._private.services.get_node_ip_address()
    gcs_port, client_port, dashboard_port = free_port(), free_port(), free_port()
    # Short private temp dir: Unix socket paths under it must stay < 108 bytes, and the
    # `ray start` address file lands there, so no other ray.init() finds this cluster.
    temp_dir = tempfile.mkdtemp(prefix="agnews-fake-", dir="/tmp")

    config = load_yaml("fake_autoscaling.yaml")
    # Fake workers dial <ip>:6379 unless told where the head's GCS is.
    config["provider"]["gcs_address"] = f"{node_ip}:{gcs_port}"
    config_path = Path(temp_dir) / "autoscaling.yaml"
    config_path.write_text(yaml.safe_dump(config))
    head_cpus = config["available_node_types"]["ray.head.default"]["resources"]["CPU"]
    worker_cpus = config["available_node_types"]["ray.worker.cpu"]["resources"]["CPU"]

    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(
        RAY_AUTH_MODE="disabled",  # else ray.init() and ray start may disagree on tokens
        RAY_USAGE_STATS_ENABLED="0",
    )
    head_env = dict(
        env,
        RAY_FAKE_CLUSTER="1",
        AUTOSCALER_UPDATE_INTERVAL_S="1",  # default 5 s per autoscaler round
    )
    ray_cli = str(Path(sys.executable).parent / "ray")
    head = subprocess.Popen(
        [
            ray_cli,
            "start",
            "--head",
            f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            f"--dashboard-port={dashboard_port}",
            "--include-dashboard=false",
            f"--num-cpus={head_cpus}",
            "--object-store-memory=100000000",
            f"--temp-dir={temp_dir}",
            f"--autoscaling-config={config_path}",
            "--disable-usage-stats",
        ],
        env=head_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        # Own session: every process it and its children start carries its pid as
        # session id, which is how cleanup finds exactly these processes.
        start_new_session=True,
    )
    session_id = head.pid
    try:
        start_output, _ = head.communicate(timeout=180)
        assert head.returncode == 0, start_output
        driver = subprocess.run(
            [sys.executable, "-c", DRIVER, f"{node_ip}:{gcs_port}"],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        lines = [x for x in driver.stdout.splitlines() if x.startswith("RESULT ")]
        assert driver.returncode == 0 and lines, (
            driver.stdout[-3000:] + driver.stderr[-3000:] + log_tail(temp_dir, "monitor.*")
        )
        result = json.loads(lines[-1].removeprefix("RESULT "))
    finally:
        monitor_log = log_tail(temp_dir, "monitor.log")
        kill_session(session_id)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(session_id)

    why = f"{json.dumps(result, indent=1)}\n{monitor_log}"
    # min_workers 0: the head alone before any demand.
    assert len(result["alive_before"]) == 1, why
    (head_id,) = result["alive_before"]
    # Scaled up: the two tasks ran on two distinct new worker nodes of the worker type.
    # Not "exactly two workers alive": on a loaded machine the v1 autoscaler can queue
    # one node too many while a slow launch is in flight, terminate it in its next
    # round (max_workers_per_type), and GCS may still list it as alive meanwhile.
    peak = result["alive_peak"]
    workers = {node: cpus for node, cpus in peak.items() if node != head_id}
    task_nodes = set(result["task_nodes"])
    assert len(task_nodes) == 2 and head_id not in task_nodes, why
    assert task_nodes <= set(workers), why
    assert set(workers.values()) == {worker_cpus}, why
    # Scaled down: the workers were removed once idle; the head stays.
    assert result["alive_after"] == [head_id], why

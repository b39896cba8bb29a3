"""End to end with real parts: `ray start`, `ray job submit -- python jobs/train.py`, the
outputs and summary it leaves, then the cluster's processes stopped."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from ray_processes import free_port, kill_session, session_pids

from agnews.synthetic import make_ag_news

REPO = Path(__file__).resolve().parent.parent
AGENT_PORTS = (
    "dashboard-agent-listen-port",
    "dashboard-agent-grpc-port",
    "metrics-export-port",
    "runtime-env-agent-port",
)


def submit(command: list[str], env: dict, wait_s: float = 120) -> subprocess.CompletedProcess:
    """`ray job submit`, retried while the head's job agent is still starting."""
    deadline = time.monotonic() + wait_s
    while True:
        job = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in job.stdout + job.stderr or time.monotonic() > deadline:
            return job
        time.sleep(2)


@pytest.mark.slow
def test_ray_job_submit_runs_the_whole_pipeline(tmp_path):
    data = make_ag_news(tmp_path / "data", train_rows=300, test_rows=60, seed=3)
    out = tmp_path / "out"
    gcs_port, client_port, dashboard_port = free_port(), free_port(), free_port()
    temp_dir = tempfile.mkdtemp(prefix="agnews-job-", dir="/tmp")  # short: socket paths
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # Both sides must agree on token auth; ray.init() would otherwise turn it on by itself.
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0")
    bin_dir = Path(sys.executable).parent
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--num-cpus=2",
            f"--port={gcs_port}",
            f"--ray-client-server-port={client_port}",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard_port}",
            "--object-store-memory=200000000",
            # Private ports for the agents too: other Ray instances may run on this machine.
            *(f"--{name}={free_port()}" for name in AGENT_PORTS),
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # cleanup kills this session's processes, and only them
    )
    try:
        started, _ = head.communicate(timeout=180)
        assert head.returncode == 0, started
        job = submit(
            [
                str(bin_dir / "ray"),
                "job",
                "submit",
                f"--address=http://127.0.0.1:{dashboard_port}",
                f"--working-dir={REPO}",
                "--",
                "python",
                "jobs/train.py",
                f"--data={data}",
                f"--out={out}",
                "--epochs=2",
                "--embed-dim=16",
                "--hidden-dim=16",
                "--predict-workers=1",
            ],
            env,
        )
        logs = job.stdout[-4000:] + job.stderr[-4000:]
        assert job.returncode == 0, logs
        assert "succeeded" in job.stdout.lower(), logs
    finally:
        kill_session(head.pid)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert not session_pids(head.pid)

    summary = json.loads((out / "summary.json").read_text())
    assert summary["rows"]["read"] == 360 and summary["rows"]["test"] == 60
    assert summary["rows"]["predicted"] + summary["rows"]["predict_rejected"] == 60
    assert summary["epochs"] == 2 and 0.0 <= summary["accuracy"] <= 1.0
    assert set(summary["seconds"]) == {"prepare", "train", "predict"}
    assert (out / "run" / "model" / "weights.pt").exists()
    predictions = pq.read_table(out / "predict" / "predictions")
    assert predictions.num_rows == 60
    report = json.loads((out / "predict" / "report.json").read_text())
    assert report["accuracy"] == pytest.approx(summary["accuracy"])
    recomputed = sum(
        r["label"] == r["pred"] for r in predictions.select(["label", "pred"]).to_pylist()
    )
    assert report["accuracy"] == pytest.approx(recomputed / 60)

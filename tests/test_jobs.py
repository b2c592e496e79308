"""`ray job submit` against a real Ray head started on 127.0.0.1, and the jobs/ submit helper."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
HEAD_START_S = 180
JOB_TIMEOUT_S = 600


def _free_ports(n: int) -> list[int]:
    """``n`` distinct ports free on 127.0.0.1 right now."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _answers(url: str) -> bool:
    """Whether anything answers HTTP at ``url`` (a 401 before auth is set up counts)."""
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


def _stop_group(proc: subprocess.Popen, grace_s: float = 8.0) -> None:
    """SIGTERM the head's process group, then SIGKILL whatever of it (and of its descendants) is left."""
    family: list[psutil.Process] = []
    with contextlib.suppress(psutil.NoSuchProcess):
        head = psutil.Process(proc.pid)
        family = [head, *head.children(recursive=True)]
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    _, alive = psutil.wait_procs(family, timeout=grace_s)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    psutil.wait_procs(alive, timeout=grace_s)
    proc.wait(timeout=15)


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head with a dashboard on free loopback ports, in its own process group and temp dir.

    Token auth is disabled on this loopback-only test cluster, for the head and the client alike. It shares
    nothing with the session's in-process Ray: other ports, other temp dir (short, for Ray's socket paths).
    """
    gcs, dash, client, agent, agent_grpc, env_agent, metrics = _free_ports(7)
    temp_dir = tempfile.mkdtemp(prefix="rjob-", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PATH=f"{BIN}{os.pathsep}{env['PATH']}")
    # Ray swaps a 127.0.0.1 node address for the machine's outward one unless it runs as a single-node Ray
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    cmd = [
        str(BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
        "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
        f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={env_agent}",
        f"--metrics-export-port={metrics}", "--num-cpus=2", "--num-gpus=0", f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
    ]
    log = open(tmp_path / "head.log", "wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + HEAD_START_S
        while not _answers(f"{address}/api/version"):
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"Ray head did not start: {(tmp_path / 'head.log').read_text(errors='replace')[-3000:]}")
            time.sleep(1)
        yield address, env
    finally:
        _stop_group(proc)
        log.close()
        leftovers = [p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])]
        for p in leftovers:  # processes of this head that left its group; ours, known by its temp dir
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftovers, f"processes of the test head outlived it: {[p.pid for p in leftovers]}"


@pytest.mark.slow
def test_ray_job_submit_runs_the_demo(ray_head, tmp_path):
    from ray.job_submission import JobStatus, JobSubmissionClient

    from enrich_dist.pipeline import STAGE_DIRS, STAGES

    address, env = ray_head
    out = tmp_path / "demo"
    submission_id = f"enrich-test-{os.getpid()}-{int(time.time())}"
    submit = [
        str(BIN / "ray"), "job", "submit", "--address", address, "--submission-id", submission_id,
        "--working-dir", "jobs", "--runtime-env", "jobs/runtime_env.yaml", "--no-wait",
        "--", "python", "enrich_job.py", "demo", "--output", str(out), "--images", "120", "--epochs", "1",
        "--sample", "40", "--replicates", "2", "--block-size", "32", "--budgets", "0.5,1.0",
    ]
    done = subprocess.run(submit, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr

    client = JobSubmissionClient(address)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    status = client.get_job_status(submission_id)
    while status not in {JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED} and time.monotonic() < deadline:
        time.sleep(3)
        status = client.get_job_status(submission_id)
    logs = client.get_job_logs(submission_id)
    assert status == JobStatus.SUCCEEDED, logs[-5000:]

    info = client.get_job_info(submission_id)
    assert info.runtime_env["env_vars"]["AWS_REQUEST_CHECKSUM_CALCULATION"] == "when_required"
    assert info.runtime_env["working_dir"].startswith("gcs://")  # jobs/ uploaded, a few KB
    assert "attaching to Ray at 127.0.0.1:" in logs  # the driver joined the cluster, on loopback

    for folder in STAGE_DIRS.values():
        assert (out / folder / "_SUCCESS").is_file(), folder
    state = json.loads((out / "run.json").read_text())
    assert list(state["stages"]) == list(STAGES)
    assert json.loads((out / "similarity/summary.json").read_text())["n_images"] == 120
    assert (out / "report/index.html").stat().st_size > 0


def test_job_working_dir_is_small():
    """The working dir uploaded with every job is jobs/ alone."""
    files = [p for p in (REPO / "jobs").rglob("*") if p.is_file() and "__pycache__" not in p.parts]
    assert sum(p.stat().st_size for p in files) < 64 * 1024, files


def _load_submit():
    import importlib.util

    spec = importlib.util.spec_from_file_location("enrich_submit", REPO / "jobs" / "submit.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_submit_helper_forwards_settings_never_credentials():
    submit = _load_submit()
    environ = {
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1",
        "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "do-not-ship", "AWS_SESSION_TOKEN": "tok",
    }
    args = submit.parse_args(
        ["--address", "http://127.0.0.1:8265", "--gpu", "--", "run", "--input", "s3://a/i", "--output", "s3://r/n"]
    )
    cmd = submit.submit_command(args, environ)
    assert cmd[:3] == ["ray", "job", "submit"] and cmd[cmd.index("--address") + 1] == "http://127.0.0.1:8265"
    assert cmd[cmd.index("--working-dir") + 1] == str(REPO / "jobs")
    env = json.loads(cmd[cmd.index("--runtime-env-json") + 1])
    assert env["env_vars"] == {
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required", "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
        "AWS_ENDPOINT_URL_S3": "http://127.0.0.1:9000", "AWS_REGION": "eu-west-1", "RAY_USAGE_STATS_ENABLED": "0",
    }
    assert "do-not-ship" not in " ".join(cmd) and "AKIAEXAMPLE" not in " ".join(cmd)
    assert cmd[cmd.index("--") + 1 :] == [
        "python", "enrich_job.py", "run", "--input", "s3://a/i", "--output", "s3://r/n", "--embed-device", "cuda",
    ]
    assert "--entrypoint-num-gpus" not in cmd  # every GPU goes to an embed actor


def test_worker_env_is_settings_only_and_empty_inside_a_job(monkeypatch):
    from enrich_dist import runtime

    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9000")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-ship")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    env = runtime.worker_env()
    assert env["AWS_ENDPOINT_URL_S3"] == "http://127.0.0.1:9000" and "AWS_SECRET_ACCESS_KEY" not in env
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    assert runtime.worker_env() == {}

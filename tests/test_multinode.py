"""Several real Ray nodes on one machine (``ray.cluster_utils.Cluster``, in a subprocess so the suite's shared
local Ray is untouched): the similarity stage's tile tasks spread over the nodes, a worker node killed in the
middle of the stage is survived with outputs equal to a clean run's, and a local run started beside the
cluster starts its own Ray instead of joining it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent(
    """
    import json, sys, threading, time
    import numpy as np, ray
    from ray.cluster_utils import Cluster
    from enrich_dist.config import SimilarityConfig
    from enrich_dist.similarity.stage import compute_similarity

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    # a local run started beside this cluster gets its own Ray, never this one (address "local")
    import os, subprocess
    probe = "from enrich_dist.runtime import ray_session\\nwith ray_session(num_cpus=1) as r: print('CPUS', r.cpus)"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    own = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=240)
    own_cpus = [int(l.split()[1]) for l in own.stdout.splitlines() if l.startswith("CPUS ")]
    rng = np.random.default_rng(7)
    x = rng.standard_normal((30000, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    cfg = SimilarityConfig(block_size=1024, top_k=5, edge_threshold=0.8, duplicate_thresholds=())
    t0 = time.monotonic()
    clean, clean_summary = compute_similarity(x, np.arange(len(x)), cfg, progress=False)
    clean_seconds = time.monotonic() - t0

    killed = {}

    def kill_one():
        time.sleep(float(sys.argv[1]) * clean_seconds)  # a share of a clean run: tiles are still running
        cluster.remove_node(nodes[0], allow_graceful=False)
        killed["at"] = time.monotonic()

    killer = threading.Thread(target=kill_one)
    started = time.monotonic()
    killer.start()
    again, summary = compute_similarity(x, np.arange(len(x)), cfg, progress=False)
    ended = time.monotonic()
    killer.join()
    for _ in range(60):  # the cluster notices the dead node within a few health checks
        alive = sum(1 for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0)
        if alive == 1:
            break
        time.sleep(0.5)
    print("RESULT " + json.dumps({
        "clean_nodes": clean_summary["tiles"]["nodes"],
        "equal": clean.equals(again),
        "summary_equal": {k: v for k, v in clean_summary.items() if k not in ("seconds", "tiles")}
                         == {k: v for k, v in summary.items() if k not in ("seconds", "tiles")},
        "alive_workers": alive,
        "tiles": summary["tiles"],
        "local_run_cpus": own_cpus,
        "killed_during_run": killed["at"] < ended,
        "run_seconds": ended - started,
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_tiles_spread_over_nodes_and_a_killed_node_is_survived(tmp_path):
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           # notice the dead node in seconds (defaults wait about 30 s)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, "0.3"], env=env, capture_output=True, text=True, timeout=600,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["clean_nodes"] == 2  # the tiles ran on both worker nodes
    assert result["local_run_cpus"] == [1], result  # a local run beside a running cluster starts its own Ray
    assert result["alive_workers"] == 1 and result["killed_during_run"], result  # killed while tiles were running
    assert result["equal"] and result["summary_equal"], result  # and the stage's output did not change

"""Several real Ray nodes on one machine (``ray.cluster_utils.Cluster``, in a subprocess so the suite's shared
local Ray is untouched): the similarity stage's tile tasks and the embedding stage's actors spread over the
nodes, a worker node killed in the middle of either stage is survived with outputs equal to a clean run's, and
a local run started beside the cluster starts its own Ray instead of joining it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

# both scripts: how many worker nodes the cluster counts once it has noticed a dead one
ALIVE = textwrap.dedent(
    """
    def alive_worker_nodes():
        import time, ray
        for _ in range(60):  # the cluster notices the dead node within a few health checks
            alive = sum(1 for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) > 0)
            if alive == 1:
                break
            time.sleep(0.5)
        return alive
    """
)

SCRIPT = ALIVE + textwrap.dedent(
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
    alive = alive_worker_nodes()
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


def run_script(script: str, args: list[str], cwd) -> dict:
    """Run a cluster script in a fresh process (dead nodes noticed in seconds); its RESULT line."""
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled",
           # notice the dead node in seconds (defaults wait about 30 s)
           "RAY_health_check_period_ms": "1000", "RAY_health_check_timeout_ms": "1000",
           "RAY_health_check_failure_threshold": "3"}
    done = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True, timeout=600,
                          cwd=cwd)
    assert done.returncode == 0, done.stderr[-4000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, done.stdout[-2000:] + done.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


@pytest.mark.slow
def test_tiles_spread_over_nodes_and_a_killed_node_is_survived(tmp_path):
    result = run_script(SCRIPT, ["0.3"], tmp_path)
    assert result["clean_nodes"] == 2  # the tiles ran on both worker nodes
    assert result["local_run_cpus"] == [1], result  # a local run beside a running cluster starts its own Ray
    assert result["alive_workers"] == 1 and result["killed_during_run"], result  # killed while tiles were running
    assert result["equal"] and result["summary_equal"], result  # and the stage's output did not change


EMBED_SCRIPT = ALIVE + textwrap.dedent(
    """
    import json, os, shutil, sys, threading, time
    from pathlib import Path
    import ray
    from ray.cluster_utils import Cluster
    from ray.util.state import list_actors
    sys.path.insert(0, sys.argv[2])  # tests/: the archive, manifest and encoder of test_embed
    from test_embed import make_run
    from enrich_dist import schema
    from enrich_dist.config import EmbedConfig
    from enrich_dist.embed import check_embed, run_embed
    from enrich_dist.storage import RunDir

    n, shard_size = int(sys.argv[3]), int(sys.argv[4])
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    cluster.wait_for_nodes()
    ray.init(address=cluster.address)
    clean, killed = RunDir(str(Path("clean").resolve())), RunDir(str(Path("killed").resolve()))
    make_run(clean, Path("."), n=n, shard_size=shard_size)  # PNGs, their manifest, a seeded VAE encoder
    shutil.copytree(clean.uri, killed.uri)  # the same manifest and encoder, nothing embedded yet
    n_shards = len(clean.shards(schema.MANIFEST_DIR))
    # the default plan: two 1-CPU actors, one a node (an actor never asks for more CPUs than a node has)
    cfg = EmbedConfig(embedder="vae")
    t0, t0_wall = time.monotonic(), time.time()
    clean_stats = run_embed(clean, cfg)
    clean_seconds = time.monotonic() - t0
    # its seconds of embedding: from its first committed shard (Ray Data and the actors' start, 5 to 11 s on a
    # busy 2-core machine, come before it) to its end
    first = min(os.path.getmtime(clean.path(p)) for p in clean.shards(schema.EMBEDDINGS_DIR).values()) - t0_wall
    embed_seconds = clean_seconds - first
    # the nodes that held an embedding actor (Ray keeps dead actors in its table); this cluster's, named
    actor_nodes = {a.node_id for a in list_actors(address=cluster.address, limit=10000)
                   if "ShardEmbedder" in a.class_name}

    killed_at = {}

    def kill_one():
        deadline = time.monotonic() + 240
        while not killed.shards(schema.EMBEDDINGS_DIR) and time.monotonic() < deadline:
            time.sleep(0.01)  # the actors are up and embedding
        time.sleep(float(sys.argv[1]) * embed_seconds)  # a share of the clean run's embedding: shards still to do
        killed_at["shards"] = len(killed.shards(schema.EMBEDDINGS_DIR))
        cluster.remove_node(nodes[0], allow_graceful=False)
        killed_at["at"] = time.monotonic()

    killer = threading.Thread(target=kill_one)
    started = time.monotonic()
    killer.start()
    stats = run_embed(killed, cfg)
    ended = time.monotonic()
    killer.join()
    alive = alive_worker_nodes()
    manifest = killed.read_table(schema.MANIFEST_DIR, columns=["image_id", "status"]).to_pylist()
    ids = killed.read_table(schema.EMBEDDINGS_DIR, columns=["image_id"]).column("image_id").to_pylist()
    clean_bytes = {p: clean.read_bytes(p) for p in clean.shards(schema.EMBEDDINGS_DIR).values()}
    killed_bytes = {p: killed.read_bytes(p) for p in killed.shards(schema.EMBEDDINGS_DIR).values()}
    print("RESULT " + json.dumps({
        "n_shards": n_shards,
        "clean_n_embedded": clean_stats["n_embedded"],
        "clean_actor_nodes": sorted(actor_nodes),
        "worker_nodes": sorted(node.node_id for node in nodes),
        "done": killed.is_done(schema.EMBEDDINGS_DIR),
        "n_embedded": stats["n_embedded"],
        "ok_ids": sorted(r["image_id"] for r in manifest if r["status"] == "ok"),
        "ids": sorted(ids),
        "problems": check_embed(killed)[1],
        "shard_files": len(killed_bytes),
        "shards_equal": len(clean_bytes) == n_shards and killed_bytes == clean_bytes,
        "alive_workers": alive,
        "shards_at_kill": killed_at["shards"],
        "killed_during_run": killed_at["at"] < ended,
        "clean_seconds": clean_seconds,
        "clean_embed_seconds": embed_seconds,
        "run_seconds": ended - started,
        "kill_after": killed_at["at"] - started,
    }), flush=True)
    ray.shutdown()
    cluster.shutdown()
    """
)


@pytest.mark.slow
def test_embed_actors_spread_over_nodes_and_a_killed_node_is_survived(tmp_path):
    n, shard_size = 1500, 10
    tests = os.path.dirname(os.path.abspath(__file__))
    result = run_script(EMBED_SCRIPT, ["0.5", tests, str(n), str(shard_size)], tmp_path)
    timings = {k: result[k] for k in ("clean_seconds", "clean_embed_seconds", "run_seconds", "kill_after",
                                      "shards_at_kill")}
    print("embed on 2 nodes, one killed:", timings)  # shown with -s
    assert result["clean_n_embedded"] == n and result["n_shards"] == n // shard_size, timings
    assert result["clean_actor_nodes"] == result["worker_nodes"], result  # an embedding actor on each worker node
    # killed while shards were being embedded: some committed, not all
    assert result["killed_during_run"] and 0 < result["shards_at_kill"] < result["n_shards"], timings
    assert result["alive_workers"] == 1, timings
    # the stage finished, every image embedded exactly once, and the committed shards are the clean run's bytes
    assert result["done"] and result["n_embedded"] == n and not result["problems"], result["problems"]
    assert result["ids"] == result["ok_ids"] and len(result["ok_ids"]) == n
    assert result["shard_files"] == result["n_shards"] and result["shards_equal"], timings

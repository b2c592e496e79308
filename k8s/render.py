"""Render every manifest under k8s/base and k8s/overlays from k8s/values.yaml (image, entrypoint, schedule).

    python k8s/render.py            # write the files
    python k8s/render.py --check    # exit 1 naming the files that differ from a fresh render
"""

from __future__ import annotations

import argparse
import logging
import re
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = "# Rendered by k8s/render.py from k8s/values.yaml: edit those and rerun it, not this file.\n"
PROFILES = ("cpu", "gpu")
CONFIGMAP = "enrich-rayjob"  # holds rayjob.yaml for the fallback CronJob (kustomize adds a content hash)
RAYJOB_FILE = "rayjob.yaml"
DATE_SUFFIX = "$(date -u +%Y-%m-%d)"  # expanded by the shell that starts the job
log = logging.getLogger("enrich_dist.k8s")


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings (scripts, embedded manifests); no anchors."""

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(*docs: dict) -> str:
    """YAML documents with the do-not-edit header."""
    body = "---\n".join(yaml.dump(d, Dumper=_Dumper, sort_keys=False, width=1000) for d in docs)
    return HEADER + body


def load_values(path: Path = HERE / "values.yaml") -> dict:
    """The values file."""
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def image(values: dict, profile: str) -> str:
    """The enrich-dist image of a profile: ``REPO@sha256:...`` when its digest is pinned, else ``REPO:TAG-cpu``."""
    digest = (values["image"].get("digests") or {}).get(profile)
    if digest:
        if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
            raise ValueError(f"image.digests.{profile} {digest!r} is not a sha256:<64 hex> digest")
        return f"{values['image']['repository']}@{digest}"
    return f"{values['image']['repository']}:{values['image']['tag']}-{profile}"


def entrypoint(values: dict, profile: str) -> str:
    """The job's driver command (a shell command): the whole pipeline on the archive, into the run dir.

    With ``datedOutput`` the run dir is ``OUTPUT/YYYY-MM-DD`` (UTC), expanded when the run starts: each night
    analyses the archive afresh, and a retry on the same day resumes that night's run.
    """
    p = values["pipeline"]
    device = values["profiles"][profile]["device"]
    head = shlex.join(["python", "-m", "enrich_dist", "run", "--input", p["input"]])
    tail = shlex.join(["--embed-device", device, *p["args"]])
    if not p["datedOutput"]:
        return f"{head} --output {shlex.quote(p['output'])} {tail}"
    if set(p["output"]) & set('"$`\\') or not p["output"]:
        raise ValueError(f"pipeline.output {p['output']!r}: a dated output cannot contain \" $ ` or \\")
    return f'{head} --output "{p["output"].rstrip("/")}/{DATE_SUFFIX}" {tail}'


def labels(values: dict, component: str, profile: str | None = None) -> dict:
    """Labels of every object; RayJobs carry the profile too."""
    out = {
        "app.kubernetes.io/name": "enrich",
        "app.kubernetes.io/instance": values["name"],
        "app.kubernetes.io/component": component,
    }
    if profile:
        out["enrich.io/profile"] = profile
    return out


def pod_security(values: dict) -> dict:
    """Pod-level security context: a fixed non-root user, the runtime's default seccomp profile."""
    sec = values["security"]
    return {
        "runAsNonRoot": True,
        "runAsUser": sec["runAsUser"],
        "runAsGroup": sec["runAsGroup"],
        "fsGroup": sec["runAsGroup"],
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security(values: dict) -> dict:
    """Container security context: no privilege escalation, no capabilities, read-only root filesystem."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": values["security"]["readOnlyRootFilesystem"],
        "runAsNonRoot": True,
    }


# Ray reports usage statistics unless told not to; every pod that runs Ray or `ray job submit` is told
NO_USAGE_STATS = ({"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},)


def storage_env(values: dict) -> list[dict]:
    """S3 settings as plain env, credentials from the Secret (never on a command line or in a runtime_env)."""
    s3 = values["s3"]
    env = [
        {"name": "AWS_REGION", "value": s3["region"]},
        {"name": "AWS_REQUEST_CHECKSUM_CALCULATION", "value": "when_required"},
        {"name": "AWS_RESPONSE_CHECKSUM_VALIDATION", "value": "when_required"},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        *NO_USAGE_STATS,
    ]
    if s3["endpoint"]:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": s3["endpoint"]})
    if s3["credentialsSecret"]:
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            env.append({"name": key, "valueFrom": {"secretKeyRef": {"name": s3["credentialsSecret"], "key": key}}})
    return env


def _resources(group: dict) -> dict:
    limits = {"cpu": group["cpu"], "memory": group["memory"]}
    if group.get("gpu"):
        limits["nvidia.com/gpu"] = group["gpu"]
    return {"requests": dict(limits), "limits": limits}


def ray_pod(values: dict, profile: str, role: str) -> dict:
    """Pod template of the Ray head or of a worker group."""
    group = values["profiles"][profile]["head" if role == "head" else "workers"]
    env = storage_env(values)
    if role == "head" and values["pseudonymKeySecret"]:  # the driver pseudonymises DICOM identifiers
        ref = {"name": values["pseudonymKeySecret"], "key": "ENRICH_PSEUDONYM_KEY"}
        env.append({"name": "ENRICH_PSEUDONYM_KEY", "valueFrom": {"secretKeyRef": ref}})
    container = {
        "name": f"ray-{role}",
        "image": image(values, profile),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "env": env,
        "resources": _resources(group),
        "securityContext": container_security(values),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, {"name": "dshm", "mountPath": "/dev/shm"}],
    }
    spec: dict = {
        "automountServiceAccountToken": False,
        "securityContext": pod_security(values),
        "containers": [container],
        "volumes": [
            {"name": "tmp", "emptyDir": {}},
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": group["shm"]}},
        ],
    }
    if group.get("gpu"):
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"metadata": {"labels": labels(values, f"ray-{role}", profile)}, "spec": spec}


def submitter_pod(values: dict, profile: str) -> dict:
    """The K8sJobMode submitter pod (KubeRay fills in the `ray job submit` command)."""
    container = {
        "name": "ray-job-submitter",
        "image": image(values, profile),
        "imagePullPolicy": values["image"]["pullPolicy"],
        "env": list(NO_USAGE_STATS),
        "resources": {"requests": {"cpu": "200m", "memory": "512Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}},
        "securityContext": container_security(values),
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    return {
        "metadata": {"labels": labels(values, "ray-job-submitter", profile)},
        "spec": {
            "restartPolicy": "Never",
            "automountServiceAccountToken": False,
            "securityContext": pod_security(values),
            "containers": [container],
            "volumes": [{"name": "tmp", "emptyDir": {}}],
        },
    }


def deletion_rules(ttl: int) -> list[dict]:
    """Delete the run's Ray cluster (not the RayJob) when the job ended or its deployment failed."""
    return [
        {"policy": "DeleteCluster", "condition": {"jobStatus": "SUCCEEDED", "ttlSeconds": ttl}},
        {"policy": "DeleteCluster", "condition": {"jobStatus": "FAILED", "ttlSeconds": ttl}},
        {"policy": "DeleteCluster", "condition": {"jobDeploymentStatus": "Failed", "ttlSeconds": 0}},
    ]


def rayjob_spec(values: dict, profile: str) -> dict:
    """The RayJob spec of one run: a fresh cluster (head + worker group), deleted after the job."""
    sched, workers = values["schedule"], values["profiles"][profile]["workers"]
    return {
        "entrypoint": entrypoint(values, profile),
        # KubeRay >= 1.6 (RayJobDeletionPolicy beta, on by default): the cluster goes once the job succeeded or
        # failed (after the TTL, time to read logs), and at once when the deployment failed before the job ran
        # (e.g. preRunningDeadlineSeconds: no GPU node); the RayJob object stays for its history
        "deletionStrategy": {"deletionRules": deletion_rules(sched["ttlSecondsAfterFinished"])},
        "activeDeadlineSeconds": sched["activeDeadlineSeconds"],
        "preRunningDeadlineSeconds": sched["preRunningDeadlineSeconds"],
        "backoffLimit": sched["backoffLimit"],
        "submissionMode": "K8sJobMode",
        "submitterPodTemplate": submitter_pod(values, profile),
        "rayClusterSpec": {
            "rayVersion": values["rayVersion"],
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": False,
            "headGroupSpec": {
                # no tasks on the head: its CPUs and memory are the driver's (selection runs there)
                "rayStartParams": {"num-cpus": "0"},
                "template": ray_pod(values, profile, "head"),
            },
            "workerGroupSpecs": [
                {
                    "groupName": f"{profile}-workers",
                    "replicas": workers["replicas"],
                    "minReplicas": workers["replicas"],
                    "maxReplicas": workers["replicas"],
                    "rayStartParams": {},
                    "template": ray_pod(values, profile, "worker"),
                }
            ],
        },
    }


def rayjob(values: dict, profile: str) -> dict:
    """A RayJob with a generated name: `kubectl create -f` it for one run (the fallback CronJob does)."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {
            "generateName": f"{values['name']}-",
            "namespace": values["namespace"],
            "labels": labels(values, "pipeline", profile),
        },
        "spec": rayjob_spec(values, profile),
    }


def raycronjob(values: dict, profile: str) -> dict:
    """The RayCronJob (KubeRay >= 1.6, RayCronJob feature gate): the same RayJob spec on the schedule."""
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayCronJob",
        "metadata": {"name": values["name"], "namespace": values["namespace"], "labels": labels(values, "schedule")},
        "spec": {
            "schedule": values["schedule"]["cron"],
            "timeZone": values["schedule"]["timeZone"],
            "jobTemplate": rayjob_spec(values, profile),
        },
    }


def namespace(values: dict) -> dict:
    """The namespace; Pod Security Admission warns and audits against the restricted profile."""
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": values["namespace"],
            "labels": {
                "pod-security.kubernetes.io/enforce": "baseline",
                "pod-security.kubernetes.io/warn": "restricted",
                "pod-security.kubernetes.io/audit": "restricted",
            },
        },
    }


def rbac(values: dict) -> list[dict]:
    """ServiceAccount, Role and RoleBinding of the fallback CronJob: RayJobs in this namespace only."""
    name, ns = f"{values['name']}-scheduler", values["namespace"]
    meta = {"name": name, "namespace": ns, "labels": labels(values, "scheduler")}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta},
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": meta,
            "rules": [{"apiGroups": ["ray.io"], "resources": ["rayjobs"], "verbs": ["create", "get", "list", "delete"]}],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": meta,
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name},
            "subjects": [{"kind": "ServiceAccount", "name": name, "namespace": ns}],
        },
    ]


def scheduler_script(values: dict) -> str:
    """Shell run by the fallback CronJob's pod: prune old runs, create one RayJob, wait for its result."""
    selector = ",".join(f"{k}={v}" for k, v in labels(values, "pipeline").items())
    keep, poll = values["schedule"]["keepFinished"], values["scheduler"]["pollSeconds"]
    # only kubectl and shell builtins: the Kubernetes project's kubectl image has no grep, head or awk to rely on
    return f"""set -eu
selector='{selector}'
kubectl get rayjobs -l "$selector" --sort-by=.metadata.creationTimestamp \\
  -o jsonpath='{{range .items[*]}}{{.metadata.name}} {{.status.jobDeploymentStatus}}{{"\\n"}}{{end}}' > /tmp/runs
finished=0
while read -r old state; do
  case "$state" in Complete|Failed) finished=$((finished + 1)) ;; esac
done < /tmp/runs
extra=$((finished - {keep}))
while read -r old state; do
  case "$state" in
    Complete|Failed) if [ "$extra" -gt 0 ]; then kubectl delete rayjob "$old" --wait=false; extra=$((extra - 1)); fi ;;
  esac
done < /tmp/runs
name=$(kubectl create -f /etc/enrich/{RAYJOB_FILE} -o jsonpath='{{.metadata.name}}')
echo "created RayJob $name"
while :; do
  state=$(kubectl get rayjob "$name" -o jsonpath='{{.status.jobDeploymentStatus}} {{.status.jobStatus}}')
  case "$state" in
    "Complete SUCCEEDED") echo "RayJob $name succeeded"; exit 0 ;;
    Complete*|Failed*) echo "RayJob $name ended: $state" >&2; exit 1 ;;
  esac
  sleep {poll}
done
"""


def cronjob(values: dict) -> dict:
    """The portable schedule: a batch/v1 CronJob whose pod creates the RayJob and waits for it (Forbid)."""
    sched, name = values["schedule"], values["name"]
    pod = {
        "metadata": {"labels": labels(values, "scheduler")},
        "spec": {
            "serviceAccountName": f"{name}-scheduler",
            "restartPolicy": "Never",
            "securityContext": {
                "runAsNonRoot": True,
                "runAsUser": 1001,
                "runAsGroup": 1001,
                "seccompProfile": {"type": "RuntimeDefault"},
            },
            "containers": [
                {
                    "name": "create-rayjob",
                    "image": values["scheduler"]["kubectlImage"],
                    "command": ["/bin/sh", "-c"],
                    "args": [scheduler_script(values)],
                    "env": [{"name": "HOME", "value": "/tmp"}],
                    "resources": {
                        "requests": {"cpu": "50m", "memory": "64Mi"},
                        "limits": {"cpu": "200m", "memory": "256Mi"},
                    },
                    "securityContext": container_security(values),
                    "volumeMounts": [
                        {"name": "rayjob", "mountPath": "/etc/enrich", "readOnly": True},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [{"name": "rayjob", "configMap": {"name": CONFIGMAP}}, {"name": "tmp", "emptyDir": {}}],
        },
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": name, "namespace": values["namespace"], "labels": labels(values, "schedule")},
        "spec": {
            "schedule": sched["cron"],
            "timeZone": sched["timeZone"],
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": labels(values, "scheduler")},
                "spec": {
                    "backoffLimit": 0,  # a retry would start a second run; KubeRay retries the run itself
                    # the RayJob's own deadline plus an hour to get its pods scheduled
                    "activeDeadlineSeconds": sched["activeDeadlineSeconds"] + 3600,
                    "template": pod,
                },
            },
        },
    }


def render(values: dict) -> dict[str, str]:
    """Every rendered file (path relative to k8s/ -> text)."""
    kustomize = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization"}
    files = {
        "base/kustomization.yaml": dump({**kustomize, "resources": ["namespace.yaml", "rbac.yaml", "cronjob.yaml"]}),
        "base/namespace.yaml": dump(namespace(values)),
        "base/rbac.yaml": dump(*rbac(values)),
        "base/cronjob.yaml": dump(cronjob(values)),
    }
    for profile in PROFILES:
        generator = {"name": CONFIGMAP, "namespace": values["namespace"], "files": [RAYJOB_FILE]}
        overlay = {**kustomize, "resources": ["../../base"], "configMapGenerator": [generator]}
        files[f"overlays/{profile}/kustomization.yaml"] = dump(overlay)
        files[f"overlays/{profile}/{RAYJOB_FILE}"] = dump(rayjob(values, profile))
        files[f"overlays/{profile}/raycronjob.yaml"] = dump(raycronjob(values, profile))
    return files


def stale(files: dict[str, str], root: Path = HERE) -> list[str]:
    """Rendered files whose checked-in copy is missing or different."""
    return [rel for rel, text in files.items() if not (root / rel).is_file() or (root / rel).read_text() != text]


def main(argv: Sequence[str] | None = None) -> int:
    """Write the rendered files, or with ``--check`` report the stale ones."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if a file is out of date")
    args = parser.parse_args(argv)
    files = render(load_values())
    out_of_date = stale(files)
    if args.check:
        for rel in out_of_date:
            log.error("k8s/%s is out of date: run `python k8s/render.py`", rel)
        return 1 if out_of_date else 0
    for rel in out_of_date:
        path = HERE / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(files[rel])
        log.info("wrote k8s/%s", rel)
    return 0


if __name__ == "__main__":
    sys.exit(main())

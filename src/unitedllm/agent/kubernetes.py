"""The Kubernetes launcher: a role runs as a Job (``unitedllm agent --launcher kubernetes``).

The Job's pod runs ``unitedllm package run ...`` in the image given with ``--k8s-image``, its
output appended to the role's log file. The role's environment (its run keys, broker login, and
the agent's ``UNITEDLLM_*`` settings) goes into a Secret of its own that the pod references with
``envFrom``; the Job manifest holds no secret value. Both are submitted with ``kubectl apply -f -``
(stdin: no secret on a command line or on disk); ``kubectl get`` follows the Job and ``kubectl
delete`` stops it. The pod must see the agent's state folder at the same path (the package zip,
the role's folder and its log): with ``--k8s-volume-claim`` the claim is mounted at the agent's
``STATE_DIR/runs``, which must live on that volume (the agent's own keys stay outside it).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from typing import Any

import yaml

from unitedllm.agent.launcher import Launcher, RoleHandle, RoleSpec, job_name, require_tool, run_tool
from unitedllm.platform.errors import PlatformError

__all__ = ["KubernetesLauncher", "role_command"]

LOG_REDIRECT = 'exec "$@" >>"$UNITEDLLM_ROLE_LOG" 2>&1'


def role_command(spec: RoleSpec) -> list[str]:
    """The spec's command as the image runs it: ``unitedllm package run ...`` (not this machine's
    interpreter path)."""
    command = list(spec.command)
    if command[1:3] == ["-m", "unitedllm.packaging"]:
        return ["unitedllm", "package", *command[3:]]
    return command


class KubernetesLauncher(Launcher):
    """Starts each role as a Kubernetes Job with its environment in a Secret."""

    name = "kubernetes"

    def __init__(
        self,
        *,
        image: str,
        namespace: str = "default",
        volume_claim: str | None = None,
        gpus: int = 0,
        check_tool: bool = True,
    ):
        if not image:
            raise PlatformError("--launcher kubernetes needs --k8s-image (an image with UnitedLLM installed)")
        self.kubectl = require_tool("kubectl", self.name) if check_tool else "kubectl"
        self.image = image
        self.namespace = namespace
        self.volume_claim = volume_claim
        self.gpus = gpus

    # -- what is submitted ----------------------------------------------------------------

    def secret_manifest(self, spec: RoleSpec, environ: dict[str, str] | None = None) -> dict[str, Any]:
        """The Secret holding the role's environment: the agent's ``UNITEDLLM_*`` settings and the spec's."""
        agent_env = os.environ if environ is None else environ
        values = {k: v for k, v in agent_env.items() if k.startswith("UNITEDLLM_")}
        values.update(spec.env)
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": f"{job_name(spec.run_id, spec.rank)}-env", "namespace": self.namespace},
            "type": "Opaque",
            "stringData": dict(sorted(values.items())),
        }

    def job_manifest(self, spec: RoleSpec) -> dict[str, Any]:
        """The Job: one pod, never restarted, running the role's command; its environment by reference."""
        name = job_name(spec.run_id, spec.rank)
        container: dict[str, Any] = {
            "name": "role",
            "image": self.image,
            "command": ["sh", "-c", LOG_REDIRECT, "unitedllm-role", *role_command(spec)],
            "workingDir": str(spec.workdir),
            "env": [
                {"name": "PYTHONUNBUFFERED", "value": "1"},
                {"name": "UNITEDLLM_ROLE_LOG", "value": str(spec.log_path)},
            ],
            "envFrom": [{"secretRef": {"name": f"{name}-env"}}],
        }
        pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container]}
        if self.gpus:
            container["resources"] = {"limits": {"nvidia.com/gpu": self.gpus}}
        if self.volume_claim:
            runs = str(spec.workdir.parent)  # STATE_DIR/runs: every role's folder, not the agent's keys
            pod["volumes"] = [
                {"name": "agent-state", "persistentVolumeClaim": {"claimName": self.volume_claim}}
            ]
            container["volumeMounts"] = [{"name": "agent-state", "mountPath": runs}]
        labels = {"app.kubernetes.io/name": "unitedllm", "unitedllm/rank": str(spec.rank)}
        return {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": name, "namespace": self.namespace, "labels": labels},
            "spec": {"backoffLimit": 0, "template": {"metadata": {"labels": labels}, "spec": pod}},
        }

    def render(self, spec: RoleSpec) -> str:
        """The Job manifest as YAML (what ``kubectl apply`` gets after the Secret)."""
        return yaml.safe_dump(self.job_manifest(spec), sort_keys=False)

    # -- the interface --------------------------------------------------------------------

    def start(self, spec: RoleSpec) -> RoleHandle:
        spec.workdir.mkdir(parents=True, exist_ok=True)
        documents = [self.secret_manifest(spec), self.job_manifest(spec)]
        text = yaml.safe_dump_all(documents, sort_keys=False)
        _kubectl(self.kubectl, ["apply", "-n", self.namespace, "-f", "-"], stdin=text)
        return KubernetesJob(self.kubectl, self.namespace, job_name(spec.run_id, spec.rank))

    def attach(self, record: dict[str, Any]) -> RoleHandle | None:
        if record.get("launcher") != self.name:
            return None
        job = KubernetesJob(self.kubectl, str(record["namespace"]), str(record["job"]))
        return job if job.status() is not None else None


def _kubectl(kubectl: str, args: list[str], *, stdin: str | None = None, check: bool = True) -> str:
    return run_tool([kubectl, *args], what=f"kubectl {args[0]}", stdin=stdin, check=check)


class KubernetesJob(RoleHandle):
    """A role's Job, followed with ``kubectl get`` and stopped with ``kubectl delete``."""

    def __init__(self, kubectl: str, namespace: str, job: str):
        self.kubectl = kubectl
        self.namespace = namespace
        self.job = job

    def status(self) -> dict[str, Any] | None:
        """The Job's status, or ``None`` once it no longer exists."""
        out = _kubectl(
            self.kubectl, ["get", "job", self.job, "-n", self.namespace, "-o", "json"], check=False
        )
        with contextlib.suppress(ValueError):
            return dict(json.loads(out).get("status") or {}) if out else None
        return None

    def poll(self) -> int | None:
        status = self.status()
        if status is None:
            return -int(signal.SIGKILL)  # deleted behind our back: it was stopped
        if status.get("succeeded"):
            self._drop_secret()
            return 0
        if status.get("failed"):
            self._drop_secret()
            return self._exit_code()
        return None

    def _drop_secret(self) -> None:
        """The role has ended: its keys need not stay in the cluster."""
        _kubectl(
            self.kubectl,
            ["delete", "secret", f"{self.job}-env", "-n", self.namespace, "--ignore-not-found"],
            check=False,
        )

    def _exit_code(self) -> int:
        out = _kubectl(
            self.kubectl,
            ["get", "pods", "-n", self.namespace, "-l", f"job-name={self.job}", "-o", "json"],
            check=False,
        )
        with contextlib.suppress(ValueError, KeyError, IndexError, TypeError):
            pod = json.loads(out)["items"][0]
            return int(pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"])
        return 1

    def stop(self, grace_s: float = 20.0) -> None:
        grace = ["--grace-period", str(max(1, int(grace_s)))]
        for kind, name in (("job", self.job), ("secret", f"{self.job}-env")):
            _kubectl(
                self.kubectl,
                [
                    "delete",
                    kind,
                    name,
                    "-n",
                    self.namespace,
                    "--cascade=foreground",
                    "--ignore-not-found",
                    *grace,
                ],
                check=False,
            )
        deadline = time.monotonic() + grace_s + 30
        while self.status() is not None and time.monotonic() < deadline:
            time.sleep(1.0)

    def record(self) -> dict[str, Any]:
        return {"launcher": "kubernetes", "namespace": self.namespace, "job": self.job}

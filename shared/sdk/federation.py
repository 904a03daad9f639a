"""Operators' handle on a federation: configure it, train it, watch its sessions and versions."""

from __future__ import annotations

import time
from typing import Any

from pathlib import Path

from . import artifacts
from .http import Client


class TrainingSession:
    def __init__(self, client: Client, body: dict) -> None:
        self.client = client
        self.id: str = body["id"]
        self.federation: str = body["federation"]
        self.last: dict = body

    def refresh(self) -> dict:
        self.last = self.client.get(f"/api/v1/training-sessions/{self.id}")
        return self.last

    @property
    def status(self) -> str:
        return self.refresh()["status"]

    def stop(self) -> dict:
        self.last = self.client.post(f"/api/v1/training-sessions/{self.id}/stop")
        return self.last

    def wait(self, timeout: float = 3600, poll: float = 1.0, until: tuple[str, ...] = ("completed", "failed", "stopped")) -> dict:
        """Poll until the session reaches one of `until`; TimeoutError otherwise."""
        end = time.monotonic() + timeout
        while (body := self.refresh())["status"] not in until:
            if time.monotonic() > end:
                raise TimeoutError(f"session {self.id} is {body['status']} after {timeout}s")
            time.sleep(poll)
        return body

    def __repr__(self) -> str:
        return f"TrainingSession({self.id!r}, federation={self.federation!r}, status={self.last.get('status')!r})"


class Federation:
    """`Federation(api_key=..., name=..., base_url=...).train(model=..., algorithm="fedavg", rounds=100, min_updates=10)`."""

    def __init__(self, api_key: str | None = None, name: str = "", base_url: str | None = None,
                 client: Client | None = None) -> None:
        if not name:
            raise ValueError("a federation needs a name")
        self.name = name
        self.client = client or Client(api_key, base_url)

    def _path(self, suffix: str = "") -> str:
        return f"/api/v1/federations/{self.name}{suffix}"

    def create(self, model: str = "tiny-llama", **fields: Any) -> dict:
        return self.client.post("/api/v1/federations", {"name": self.name, "model_id": model, **fields})

    def get(self) -> dict:
        return self.client.get(self._path())

    def delete(self) -> None:
        self.client.delete(self._path())

    def configure_adapter(self, type: str = "lora", **fields: Any) -> dict:
        return self.client.put(self._path("/adapter"), {"type": type, **fields})

    def configure_strategy(self, algorithm: str = "fedavg", **fields: Any) -> dict:
        return self.client.put(self._path("/strategy"), {"algorithm": algorithm, **fields})

    def train(self, model: str, algorithm: str = "fedavg", rounds: int = 100, min_updates: int = 10,
              adapter: dict | None = None, strategy_params: dict | None = None, round_config: dict | None = None,
              device_filter: dict | None = None, evaluation: dict | None = None,
              aggregation: dict | None = None, wait_started: float | None = 120) -> TrainingSession:
        """Start a training session of `rounds` rounds on this federation (created if it does not exist).

        A worker publishes the first version and opens the round; this waits up to `wait_started`
        seconds for that (None: return at once, while the session is still "pending").
        """
        body: dict[str, Any] = {
            "model_id": model, "strategy": algorithm, "federation": self.name,
            "round_config": {"max_rounds": rounds, "min_clients": min_updates, **(round_config or {})},
        }
        for key, value in (("adapter_config", adapter), ("strategy_params", strategy_params),
                           ("device_filter", device_filter), ("evaluation", evaluation),
                           ("aggregation", aggregation)):
            if value is not None:
                body[key] = value
        session = TrainingSession(self.client, self.client.post("/api/v1/training-sessions", body))
        if wait_started is not None and session.last["status"] == "pending":
            try:
                session.wait(wait_started, poll=0.2, until=("active", "aggregating", "completed", "failed", "stopped"))
            except TimeoutError:
                raise TimeoutError(f"session {session.id} is still pending after {wait_started}s: "
                                   "no worker opened its round (is a `fleettune worker` running?)") from None
        return session

    def register_device(self, device_id: str, ram_mb: int | None = None, storage_mb: int | None = None,
                        tier: str = "default", identity_key: bytes | None = None) -> str:
        """Enroll a device; returns its token (shown once). `identity_key`: its Ed25519 public key
        for secure aggregation, which the device then cannot replace."""
        body = {"device_id": device_id, "ram_mb": ram_mb, "storage_mb": storage_mb, "tier": tier}
        if identity_key is not None:
            body["identity_key"] = identity_key.hex()
        return self.client.post(self._path("/devices"), body)["token"]

    def devices(self) -> list[dict]:
        return self.client.get(self._path("/devices"))["devices"]

    def revoke_device(self, device_id: str) -> None:
        self.client.delete(self._path(f"/devices/{device_id}"))

    def set_group(self, group: str, devices: list[str] | None = None, rules: dict | None = None,
                  kind: str | None = None, exclude: list[str] | None = None) -> dict:
        """A static group (`devices`), a dynamic one (`rules` over declared capabilities) or both (hybrid)."""
        body = {"devices": devices or [], "rules": rules, "kind": kind, "exclude": exclude or []}
        return self.client.put(self._path(f"/groups/{group}"), {k: v for k, v in body.items() if v is not None})

    def group(self, group: str) -> dict:
        return self.client.get(self._path(f"/groups/{group}"))

    def groups(self) -> dict[str, int]:
        return self.client.get(self._path("/groups"))["groups"]

    def delete_group(self, group: str) -> None:
        self.client.delete(self._path(f"/groups/{group}"))

    def set_deployment(self, tiers: dict[str, dict]) -> dict:
        """tier -> {"mode": "train" | "infer" | "api", "base_model", "adapter", "api_url", "distillation"}."""
        return self.client.put(self._path("/deployment"), {"tiers": tiers})

    def deployment(self) -> dict:
        return self.client.get(self._path("/deployment"))["tiers"]

    def rollout(self, version: int, groups: list[str] | None = None, start_percent: float = 10,
                step_percent: float = 10, min_step_seconds: float = 3600, auto_advance: bool = True,
                gates: dict | None = None, start: bool = False,
                max_step_seconds: float | None = 7 * 24 * 3600) -> dict:
        """Create a canary rollout of a published version (and start it, with `start`). A step that
        neither advances nor rolls back within `max_step_seconds` pauses as inconclusive (None: never)."""
        return self.client.post(self._path("/rollouts"), {
            "version": version, "groups": groups or [], "start_percent": start_percent,
            "step_percent": step_percent, "min_step_seconds": min_step_seconds, "auto_advance": auto_advance,
            "gates": gates or {}, "start": start, "max_step_seconds": max_step_seconds})

    def rollouts(self) -> list[dict]:
        return self.client.get(self._path("/rollouts"))["rollouts"]

    def get_rollout(self, rollout_id: str) -> dict:
        return self.client.get(self._path(f"/rollouts/{rollout_id}"))

    def rollout_action(self, rollout_id: str, action: str, reason: str | None = None,
                       percent: float | None = None) -> dict:
        """start, advance, pause, resume, rollback, promote; or percentage (with `percent` and a reason)."""
        if action == "percentage":
            return self.client.post(self._path(f"/rollouts/{rollout_id}/percentage"),
                                    {"percent": percent, "reason": reason})
        return self.client.post(self._path(f"/rollouts/{rollout_id}/{action}"),
                                {"reason": reason} if reason else None)

    def serving(self) -> dict:
        return self.client.get(self._path("/serving"))

    def round(self, round_no: int) -> dict:
        return self.client.get(self._path(f"/rounds/{round_no}"))

    def artifacts(self, version: int) -> list[dict]:
        """The version's exports to on-device runtimes: status, parity, base and adapter files."""
        return self.client.get(self._path(f"/versions/{version}/artifacts"))["artifacts"]

    def export(self, version: int, formats: list[str]) -> dict:
        """Ask a worker to export the version to these formats (onnx, executorch, coreml, litert)."""
        return self.client.post(self._path(f"/versions/{version}/artifacts"), {"formats": list(formats)})

    def download_artifact(self, artifact: dict, directory, progress: bool = True) -> dict[str, Path]:
        """A ready artifact's base and adapter into `directory`, checked against their sha256."""
        out = {}
        for part in ("base", "adapter"):
            f = artifact[part]
            name = f["key"].rsplit("/", 1)[-1]
            out[part] = artifacts.fetch(self.client, f["download"], f["sha256"], f["size"], Path(directory) / name,
                                        progress, f"{artifact['format']} {part}")
        return out

    def versions(self, limit: int = 100, before: int | None = None) -> list[dict]:
        """The newest `limit` published versions (below `before`, if given), oldest first."""
        params = {"limit": limit} | ({"before": before} if before is not None else {})
        return self.client.get(self._path("/versions"), params=params)["versions"]

"""A device's side of the gateway: check in, download the version, upload the update, submit it.

It holds one device token and the URLs the gateway hands it: no broker or storage credentials.
"""

from __future__ import annotations

import hashlib
import time
from typing import Any

import msgpack

from . import artifacts
from .http import Client, FleettuneAPIError, raise_for_problem


class DeviceClient:
    def __init__(self, token: str, federation: str, base_url: str | None = None, client: Client | None = None) -> None:
        self.federation = federation
        self.client = client or Client(token, base_url)

    def _path(self, suffix: str) -> str:
        return f"/api/v1/federations/{self.federation}{suffix}"

    def check_in(self, ram_mb: int | None = None, storage_mb: int | None = None, tier: str = "default",
                 **capabilities: str) -> dict:
        """What to run (`serve`) and the round to train in, with download and upload URLs.

        `capabilities`: os, app_version, region, accelerator (dynamic groups match on them). A
        training tier with nothing to train gets FleettuneAPIError 403/409, whose `body["serve"]`
        still says what to run.
        """
        return self.client.post(self._path("/check-in"),
                                {"ram_mb": ram_mb, "storage_mb": storage_mb, "tier": tier, **capabilities})

    def serving(self, **check_in: Any) -> dict:
        """Only what to run: the `serve` part of a check-in, whether or not there is a round to train.
        It is a check-in: a training tier with an open round to join joins it."""
        try:
            return self.check_in(**check_in)["serve"]
        except FleettuneAPIError as refused:
            if "serve" not in refused.body:
                raise
            return refused.body["serve"]

    def fetch_runtime(self, serve: dict, cache_dir, progress: bool = False):
        """(base, adapter) local files of `serve.runtime`: the exported base (once per sha256: declare
        it back as `runtime_base` and later check-ins serve only the adapter) and the version's adapter."""
        return artifacts.fetch_served(self.client, serve["runtime"], cache_dir, progress)

    def download_served(self, serve: dict, name: str = "adapter_model.safetensors") -> bytes:
        return self.client.download(serve["adapter"]["download"][name], max_bytes=64 * 1024 * 1024)

    def report(self, version: int, eval_loss: float | None = None, acceptance_rate: float | None = None,
               requests: int | None = None, errors: int | None = None, perplexity: float | None = None) -> dict:
        """Quality of the version this device serves, for its canary's gates."""
        body = {"version": version, "eval_loss": eval_loss, "perplexity": perplexity,
                "acceptance_rate": acceptance_rate, "requests": requests, "errors": errors}
        return self.client.post(self._path("/reports"), {k: v for k, v in body.items() if v is not None})

    def download(self, plan: dict, name: str = "adapter_model.safetensors") -> bytes:
        return self.client.download(plan["download"][name], max_bytes=plan.get("max_update_bytes"))

    def upload(self, plan: dict, blob: bytes) -> str:
        """Upload the update to this device's write-once key; returns its sha256.

        The URL comes from upload-url, bound to these bytes: the store refuses any other body."""
        sha256 = hashlib.sha256(blob).hexdigest()
        signed = self.client.post(self._path("/upload-url"), {"round": plan["round"], "sha256": sha256,
                                                              "size": len(blob)})
        self.client.upload(signed, blob)
        return sha256

    def submit(self, plan: dict, sha256: str, num_samples: int, train_seconds: float = 0.0,
               metrics: dict[str, float] | None = None) -> dict:
        return self.client.post(self._path("/updates"), {
            "round": plan["round"], "sha256": sha256, "num_samples": num_samples,
            "base_version": plan["base_version"], "train_seconds": train_seconds, "metrics": metrics or {}})

    def split_post(self, action: str, blob: bytes, params: dict) -> tuple[bytes, dict[str, str]]:
        """One split-learning message through the gateway: (the answer's bytes, its headers)."""
        response = self.client.http.post(self._path(f"/split/{action}"), content=blob, params=params,
                                         headers={"Content-Type": "application/vnd.safetensors"})
        raise_for_problem(response)
        return response.content, {k.lower(): v for k, v in response.headers.items()}

    # --- secure aggregation (see fleettune.shared.secagg.participant for the whole exchange) ----------

    def register_identity(self, public_key: bytes) -> dict:
        """Register this device's Ed25519 identity public key, once (a different one later is a 409)."""
        return self.client.put(self._path("/identity"), {"public_key": public_key.hex()})

    def secagg_stage(self, round_no: int) -> dict:
        """The round's secure-aggregation stage and this device's input for it."""
        response = self.client.http.get(self._path(f"/secagg/{round_no}"))
        raise_for_problem(response)
        return msgpack.unpackb(response.content, raw=False, max_bin_len=1 << 20)

    def secagg_answer(self, round_no: int, stage: str, message: dict) -> dict:
        return self.client.request("POST", self._path(f"/secagg/{round_no}/{stage}"),
                                   content=msgpack.packb(message, use_bin_type=True),
                                   headers={"Content-Type": "application/msgpack"})

    def secagg_upload(self, round_no: int, blob: bytes) -> str:
        """Upload a masked input through its write-once URL; returns its sha256."""
        sha256 = hashlib.sha256(blob).hexdigest()
        self.client.upload(self.client.post(self._path(f"/secagg/{round_no}/masked-url"), {"sha256": sha256}), blob)
        return sha256

    def receipt(self, receipt: str) -> dict:
        return self.client.get(self._path(f"/receipts/{receipt}"))

    def wait_outcome(self, receipt: str, timeout: float = 60, poll: float = 0.1) -> dict:
        end = time.monotonic() + timeout
        while (body := self.receipt(receipt))["status"] == "pending":
            if time.monotonic() > end:
                raise TimeoutError(f"receipt {receipt[:12]} still pending after {timeout}s")
            time.sleep(poll)
        return body

    def send(self, plan: dict, blob: bytes, num_samples: int, train_seconds: float = 0.0,
             metrics: dict[str, Any] | None = None) -> dict:
        """Upload then submit: the whole post-training half of a round."""
        sha256 = self.upload(plan, blob)
        return self.submit(plan, sha256, num_samples, train_seconds, metrics)


__all__ = ["DeviceClient", "FleettuneAPIError"]

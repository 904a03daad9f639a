"""The fleettune Python SDK, installed as the `fleettune` package: `from fleettune import Federation`.

It speaks only HTTP (httpx) to the API and to presigned URLs; it needs no server credentials.
"""

from .device import DeviceClient
from .federation import Federation, TrainingSession
from .http import Client, FleettuneAPIError
from .registry import ModelRegistry

__all__ = ["Client", "DeviceClient", "Federation", "FleettuneAPIError", "ModelRegistry", "TrainingSession"]

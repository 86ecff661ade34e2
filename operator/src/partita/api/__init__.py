"""partita.api: the DevicePool and EdgeModel kinds (group partita.dev, v1alpha1) as pydantic
models, and the CRDs generated from them (`partita.api.crd`)."""

from partita.api.devicepool import DevicePool, DevicePoolSpec, DevicePoolStatus
from partita.api.edgemodel import EdgeModel, EdgeModelSpec, EdgeModelStatus, Phase
from partita.api.errors import ApiError, ManifestError
from partita.api.meta import API_VERSION, GROUP, VERSION, Condition, ConditionStatus, Tier

__all__ = [
    "API_VERSION",
    "GROUP",
    "VERSION",
    "ApiError",
    "Condition",
    "ConditionStatus",
    "DevicePool",
    "DevicePoolSpec",
    "DevicePoolStatus",
    "EdgeModel",
    "EdgeModelSpec",
    "EdgeModelStatus",
    "ManifestError",
    "Phase",
    "Tier",
]

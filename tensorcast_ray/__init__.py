"""tensorcast_ray: a shared, tiered tensor store for Ray clusters.  [SDK]

    import tensorcast_ray as tc
    tc.init()                                   # inside any Ray job, task, actor or replica
    tc.put(model.state_dict(), key="llama:v1")
    weights = tc.get("llama:latest")            # zero-copy on the node

Importing this package imports neither torch nor ray; both load on first use.
"""

from tensorcast_ray._bootstrap import InitContext, Versions, init, is_initialized, shutdown
from tensorcast_ray._config import DaemonConfig, GlobalStoreConfig, PortConfig
from tensorcast_ray._errors import (
    AbortedError,
    AlreadyExistsError,
    ArtifactError,
    DataLossError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnavailableError,
    UnimplementedError,
)
from tensorcast_ray._policy import StorePolicy, TierSpec
from tensorcast_ray._retry import RetryPolicy
from tensorcast_ray._version import __version__

__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "ArtifactError",
    "DaemonConfig",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GlobalStoreConfig",
    "InitContext",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PortConfig",
    "ResourceExhaustedError",
    "RetryPolicy",
    "StorePolicy",
    "TierSpec",
    "UnavailableError",
    "UnimplementedError",
    "Versions",
    "__version__",
    "init",
    "is_initialized",
    "shutdown",
]

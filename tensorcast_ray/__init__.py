"""tensorcast_ray: a shared, tiered tensor store for Ray clusters.  [SDK]

    import tensorcast_ray as tc
    tc.init()                                   # inside any Ray job, task, actor or replica
    tc.put(model.state_dict(), key="llama:v1")
    weights = tc.get("llama:latest")            # zero-copy on the node

Importing this package imports neither torch nor ray; both load on first use.
"""

from tensorcast_ray import weights
from tensorcast_ray._api import (
    artifact,
    delete,
    empty,
    empty_like,
    exists,
    get,
    get_into,
    list_keys,
    persistence_status,
    put,
    register,
    replicate,
    store,
    wait_persisted,
)
from tensorcast_ray._artifact import Artifact, ArtifactInfo, ArtifactView
from tensorcast_ray._bootstrap import InitContext, Versions, init, is_initialized, shutdown
from tensorcast_ray._checkpoint_io import export, import_checkpoint
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
from tensorcast_ray._persistence import PersistenceStatus, ShardStatus
from tensorcast_ray._policy import StorePolicy, TierSpec
from tensorcast_ray._retry import RetryPolicy
from tensorcast_ray._store import GetArtifactOptions, ReplicaResult, Store, StoreOptions
from tensorcast_ray._version import __version__
from tensorcast_ray._write import PutResult


def metrics_text() -> str:
    """This process's SDK metrics in the Prometheus text format."""
    from tensorcast_ray._metrics import get_sdk_metrics

    return get_sdk_metrics().text()


__all__ = [
    "AbortedError",
    "AlreadyExistsError",
    "Artifact",
    "ArtifactError",
    "ArtifactInfo",
    "ArtifactView",
    "DaemonConfig",
    "DataLossError",
    "DeadlineExceededError",
    "FailedPreconditionError",
    "GetArtifactOptions",
    "GlobalStoreConfig",
    "InitContext",
    "InternalError",
    "InvalidArgumentError",
    "NotFoundError",
    "PermissionDeniedError",
    "PersistenceStatus",
    "PortConfig",
    "PutResult",
    "ReplicaResult",
    "ResourceExhaustedError",
    "RetryPolicy",
    "ShardStatus",
    "Store",
    "StoreOptions",
    "StorePolicy",
    "TierSpec",
    "UnavailableError",
    "UnimplementedError",
    "Versions",
    "__version__",
    "artifact",
    "delete",
    "empty",
    "empty_like",
    "exists",
    "export",
    "get",
    "get_into",
    "import_checkpoint",
    "init",
    "is_initialized",
    "list_keys",
    "metrics_text",
    "persistence_status",
    "put",
    "register",
    "replicate",
    "shutdown",
    "store",
    "wait_persisted",
    "weights",
]

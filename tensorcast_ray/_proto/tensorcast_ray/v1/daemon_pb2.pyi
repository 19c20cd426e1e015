from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WriteKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WRITE_KIND_UNSPECIFIED: _ClassVar[WriteKind]
    WRITE_KIND_PUT: _ClassVar[WriteKind]
    WRITE_KIND_REGISTER: _ClassVar[WriteKind]

class ReadSource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    READ_SOURCE_AUTO: _ClassVar[ReadSource]
    READ_SOURCE_LOCAL_ONLY: _ClassVar[ReadSource]
    READ_SOURCE_REMOTE: _ClassVar[ReadSource]
    READ_SOURCE_DISK: _ClassVar[ReadSource]
WRITE_KIND_UNSPECIFIED: WriteKind
WRITE_KIND_PUT: WriteKind
WRITE_KIND_REGISTER: WriteKind
READ_SOURCE_AUTO: ReadSource
READ_SOURCE_LOCAL_ONLY: ReadSource
READ_SOURCE_REMOTE: ReadSource
READ_SOURCE_DISK: ReadSource

class HelloRequest(_message.Message):
    __slots__ = ("sdk_version", "protocol", "pid", "hostname")
    SDK_VERSION_FIELD_NUMBER: _ClassVar[int]
    PROTOCOL_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    sdk_version: str
    protocol: int
    pid: int
    hostname: str
    def __init__(self, sdk_version: _Optional[str] = ..., protocol: _Optional[int] = ..., pid: _Optional[int] = ..., hostname: _Optional[str] = ...) -> None: ...

class HelloResponse(_message.Message):
    __slots__ = ("versions", "node_id", "namespace", "instance_id", "hostname", "local_socket", "shm_dir", "epoch_segment", "epoch_slots", "global_store_address", "address", "metrics_address", "segment_bytes", "staging_bytes")
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SEGMENT_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SLOTS_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_BYTES_FIELD_NUMBER: _ClassVar[int]
    STAGING_BYTES_FIELD_NUMBER: _ClassVar[int]
    versions: _common_pb2.VersionInfo
    node_id: str
    namespace: str
    instance_id: str
    hostname: str
    local_socket: str
    shm_dir: str
    epoch_segment: str
    epoch_slots: int
    global_store_address: str
    address: str
    metrics_address: str
    segment_bytes: int
    staging_bytes: int
    def __init__(self, versions: _Optional[_Union[_common_pb2.VersionInfo, _Mapping]] = ..., node_id: _Optional[str] = ..., namespace: _Optional[str] = ..., instance_id: _Optional[str] = ..., hostname: _Optional[str] = ..., local_socket: _Optional[str] = ..., shm_dir: _Optional[str] = ..., epoch_segment: _Optional[str] = ..., epoch_slots: _Optional[int] = ..., global_store_address: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., segment_bytes: _Optional[int] = ..., staging_bytes: _Optional[int] = ...) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class TierUsage(_message.Message):
    __slots__ = ("tier", "used_bytes", "capacity_bytes", "entries")
    TIER_FIELD_NUMBER: _ClassVar[int]
    USED_BYTES_FIELD_NUMBER: _ClassVar[int]
    CAPACITY_BYTES_FIELD_NUMBER: _ClassVar[int]
    ENTRIES_FIELD_NUMBER: _ClassVar[int]
    tier: str
    used_bytes: int
    capacity_bytes: int
    entries: int
    def __init__(self, tier: _Optional[str] = ..., used_bytes: _Optional[int] = ..., capacity_bytes: _Optional[int] = ..., entries: _Optional[int] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("node_id", "version", "build", "address", "metrics_address", "uptime_s", "clients", "artifacts", "bytes", "leases", "tiers", "namespace", "local_socket", "pid", "global_store_address", "shm_pool_bytes", "instance_id")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    BUILD_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    CLIENTS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    BYTES_FIELD_NUMBER: _ClassVar[int]
    LEASES_FIELD_NUMBER: _ClassVar[int]
    TIERS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    LOCAL_SOCKET_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    GLOBAL_STORE_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    SHM_POOL_BYTES_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    version: str
    build: str
    address: str
    metrics_address: str
    uptime_s: float
    clients: int
    artifacts: int
    bytes: int
    leases: int
    tiers: _containers.RepeatedCompositeFieldContainer[TierUsage]
    namespace: str
    local_socket: str
    pid: int
    global_store_address: str
    shm_pool_bytes: int
    instance_id: str
    def __init__(self, node_id: _Optional[str] = ..., version: _Optional[str] = ..., build: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., uptime_s: _Optional[float] = ..., clients: _Optional[int] = ..., artifacts: _Optional[int] = ..., bytes: _Optional[int] = ..., leases: _Optional[int] = ..., tiers: _Optional[_Iterable[_Union[TierUsage, _Mapping]]] = ..., namespace: _Optional[str] = ..., local_socket: _Optional[str] = ..., pid: _Optional[int] = ..., global_store_address: _Optional[str] = ..., shm_pool_bytes: _Optional[int] = ..., instance_id: _Optional[str] = ...) -> None: ...

class SessionRequest(_message.Message):
    __slots__ = ("pid", "hostname", "client_name", "resume_secret")
    PID_FIELD_NUMBER: _ClassVar[int]
    HOSTNAME_FIELD_NUMBER: _ClassVar[int]
    CLIENT_NAME_FIELD_NUMBER: _ClassVar[int]
    RESUME_SECRET_FIELD_NUMBER: _ClassVar[int]
    pid: int
    hostname: str
    client_name: str
    resume_secret: str
    def __init__(self, pid: _Optional[int] = ..., hostname: _Optional[str] = ..., client_name: _Optional[str] = ..., resume_secret: _Optional[str] = ...) -> None: ...

class SessionEvent(_message.Message):
    __slots__ = ("session_id", "lease_secret")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    LEASE_SECRET_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    lease_secret: str
    def __init__(self, session_id: _Optional[str] = ..., lease_secret: _Optional[str] = ...) -> None: ...

class BeginWriteRequest(_message.Message):
    __slots__ = ("key", "kind", "session_id", "tensors", "policy_json", "ttl_ms", "staged_segments", "request_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    STAGED_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    kind: WriteKind
    session_id: str
    tensors: _common_pb2.TensorTable
    policy_json: str
    ttl_ms: int
    staged_segments: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, key: _Optional[str] = ..., kind: _Optional[_Union[WriteKind, str]] = ..., session_id: _Optional[str] = ..., tensors: _Optional[_Union[_common_pb2.TensorTable, _Mapping]] = ..., policy_json: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., staged_segments: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class BeginWriteResponse(_message.Message):
    __slots__ = ("write_id", "artifact_id", "segments", "tensor_segments", "tensor_offsets", "shm_dir", "stageable", "stageable_small", "committed")
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSOR_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    STAGEABLE_FIELD_NUMBER: _ClassVar[int]
    STAGEABLE_SMALL_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    artifact_id: str
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.SegmentRef]
    tensor_segments: _containers.RepeatedScalarFieldContainer[int]
    tensor_offsets: _containers.RepeatedScalarFieldContainer[int]
    shm_dir: str
    stageable: int
    stageable_small: int
    committed: WriteResult
    def __init__(self, write_id: _Optional[str] = ..., artifact_id: _Optional[str] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.SegmentRef, _Mapping]]] = ..., tensor_segments: _Optional[_Iterable[int]] = ..., tensor_offsets: _Optional[_Iterable[int]] = ..., shm_dir: _Optional[str] = ..., stageable: _Optional[int] = ..., stageable_small: _Optional[int] = ..., committed: _Optional[_Union[WriteResult, _Mapping]] = ...) -> None: ...

class CommitWriteRequest(_message.Message):
    __slots__ = ("write_id",)
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    def __init__(self, write_id: _Optional[str] = ...) -> None: ...

class WriteResult(_message.Message):
    __slots__ = ("key", "artifact_id", "nbytes", "status", "degraded_reasons", "persistence_task_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASONS_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    artifact_id: str
    nbytes: int
    status: str
    degraded_reasons: _containers.RepeatedScalarFieldContainer[str]
    persistence_task_id: str
    def __init__(self, key: _Optional[str] = ..., artifact_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., status: _Optional[str] = ..., degraded_reasons: _Optional[_Iterable[str]] = ..., persistence_task_id: _Optional[str] = ...) -> None: ...

class AbortWriteRequest(_message.Message):
    __slots__ = ("write_id",)
    WRITE_ID_FIELD_NUMBER: _ClassVar[int]
    write_id: str
    def __init__(self, write_id: _Optional[str] = ...) -> None: ...

class AbortWriteResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class LeaseSegmentsRequest(_message.Message):
    __slots__ = ("session_id", "count", "held", "small_count")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    SMALL_COUNT_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    count: int
    held: _containers.RepeatedScalarFieldContainer[str]
    small_count: int
    def __init__(self, session_id: _Optional[str] = ..., count: _Optional[int] = ..., held: _Optional[_Iterable[str]] = ..., small_count: _Optional[int] = ...) -> None: ...

class LeaseSegmentsResponse(_message.Message):
    __slots__ = ("segments", "shm_dir")
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.SegmentRef]
    shm_dir: str
    def __init__(self, segments: _Optional[_Iterable[_Union[_common_pb2.SegmentRef, _Mapping]]] = ..., shm_dir: _Optional[str] = ...) -> None: ...

class AllocateBufferRequest(_message.Message):
    __slots__ = ("session_id", "nbytes")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    nbytes: int
    def __init__(self, session_id: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class AllocateBufferResponse(_message.Message):
    __slots__ = ("buffer_id", "segment", "shm_dir")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    segment: _common_pb2.SegmentRef
    shm_dir: str
    def __init__(self, buffer_id: _Optional[str] = ..., segment: _Optional[_Union[_common_pb2.SegmentRef, _Mapping]] = ..., shm_dir: _Optional[str] = ...) -> None: ...

class ReleaseBuffersRequest(_message.Message):
    __slots__ = ("session_id", "buffer_ids")
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    BUFFER_IDS_FIELD_NUMBER: _ClassVar[int]
    session_id: str
    buffer_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, session_id: _Optional[str] = ..., buffer_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class ReleaseBuffersResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class RegisterBuffersRequest(_message.Message):
    __slots__ = ("key", "session_id", "tensors", "buffer_ids", "buffer_index", "buffer_offsets", "policy_json", "ttl_ms", "request_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_IDS_FIELD_NUMBER: _ClassVar[int]
    BUFFER_INDEX_FIELD_NUMBER: _ClassVar[int]
    BUFFER_OFFSETS_FIELD_NUMBER: _ClassVar[int]
    POLICY_JSON_FIELD_NUMBER: _ClassVar[int]
    TTL_MS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    session_id: str
    tensors: _common_pb2.TensorTable
    buffer_ids: _containers.RepeatedScalarFieldContainer[str]
    buffer_index: _containers.RepeatedScalarFieldContainer[int]
    buffer_offsets: _containers.RepeatedScalarFieldContainer[int]
    policy_json: str
    ttl_ms: int
    request_id: str
    def __init__(self, key: _Optional[str] = ..., session_id: _Optional[str] = ..., tensors: _Optional[_Union[_common_pb2.TensorTable, _Mapping]] = ..., buffer_ids: _Optional[_Iterable[str]] = ..., buffer_index: _Optional[_Iterable[int]] = ..., buffer_offsets: _Optional[_Iterable[int]] = ..., policy_json: _Optional[str] = ..., ttl_ms: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("key", "artifact_id", "source", "metadata_only")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    METADATA_ONLY_FIELD_NUMBER: _ClassVar[int]
    key: str
    artifact_id: str
    source: ReadSource
    metadata_only: bool
    def __init__(self, key: _Optional[str] = ..., artifact_id: _Optional[str] = ..., source: _Optional[_Union[ReadSource, str]] = ..., metadata_only: _Optional[bool] = ...) -> None: ...

class ArtifactInfo(_message.Message):
    __slots__ = ("key", "artifact_id", "nbytes", "segments", "tensors", "shm_dir", "epoch_slot", "generation", "kind", "created_unix_ms", "served_by", "remote", "durable", "persistence_task_id", "persistence_state", "persistence_error")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    SEGMENTS_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    EPOCH_SLOT_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    REMOTE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_STATE_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    key: str
    artifact_id: str
    nbytes: int
    segments: _containers.RepeatedCompositeFieldContainer[_common_pb2.SegmentRef]
    tensors: _common_pb2.TensorTable
    shm_dir: str
    epoch_slot: int
    generation: int
    kind: str
    created_unix_ms: int
    served_by: str
    remote: bool
    durable: bool
    persistence_task_id: str
    persistence_state: str
    persistence_error: str
    def __init__(self, key: _Optional[str] = ..., artifact_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., segments: _Optional[_Iterable[_Union[_common_pb2.SegmentRef, _Mapping]]] = ..., tensors: _Optional[_Union[_common_pb2.TensorTable, _Mapping]] = ..., shm_dir: _Optional[str] = ..., epoch_slot: _Optional[int] = ..., generation: _Optional[int] = ..., kind: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., served_by: _Optional[str] = ..., remote: _Optional[bool] = ..., durable: _Optional[bool] = ..., persistence_task_id: _Optional[str] = ..., persistence_state: _Optional[str] = ..., persistence_error: _Optional[str] = ...) -> None: ...

class InspectRequest(_message.Message):
    __slots__ = ("key", "artifact_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    artifact_id: str
    def __init__(self, key: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class ReplicaInfo(_message.Message):
    __slots__ = ("node_id", "kind", "tier")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    kind: str
    tier: str
    def __init__(self, node_id: _Optional[str] = ..., kind: _Optional[str] = ..., tier: _Optional[str] = ...) -> None: ...

class InspectResponse(_message.Message):
    __slots__ = ("key", "artifact_id", "nbytes", "tensors", "writer", "replicas", "local", "local_kind", "served_by", "created_unix_ms", "kind", "durable", "persistence_task_id", "persistence_state", "persistence_error")
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    TENSORS_FIELD_NUMBER: _ClassVar[int]
    WRITER_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    LOCAL_FIELD_NUMBER: _ClassVar[int]
    LOCAL_KIND_FIELD_NUMBER: _ClassVar[int]
    SERVED_BY_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_TASK_ID_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_STATE_FIELD_NUMBER: _ClassVar[int]
    PERSISTENCE_ERROR_FIELD_NUMBER: _ClassVar[int]
    key: str
    artifact_id: str
    nbytes: int
    tensors: int
    writer: str
    replicas: _containers.RepeatedCompositeFieldContainer[ReplicaInfo]
    local: bool
    local_kind: str
    served_by: str
    created_unix_ms: int
    kind: str
    durable: bool
    persistence_task_id: str
    persistence_state: str
    persistence_error: str
    def __init__(self, key: _Optional[str] = ..., artifact_id: _Optional[str] = ..., nbytes: _Optional[int] = ..., tensors: _Optional[int] = ..., writer: _Optional[str] = ..., replicas: _Optional[_Iterable[_Union[ReplicaInfo, _Mapping]]] = ..., local: _Optional[bool] = ..., local_kind: _Optional[str] = ..., served_by: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., kind: _Optional[str] = ..., durable: _Optional[bool] = ..., persistence_task_id: _Optional[str] = ..., persistence_state: _Optional[str] = ..., persistence_error: _Optional[str] = ...) -> None: ...

class ReadRangesRequest(_message.Message):
    __slots__ = ("artifact_id", "session_id", "segment", "offset", "length")
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    artifact_id: str
    session_id: str
    segment: _containers.RepeatedScalarFieldContainer[int]
    offset: _containers.RepeatedScalarFieldContainer[int]
    length: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, artifact_id: _Optional[str] = ..., session_id: _Optional[str] = ..., segment: _Optional[_Iterable[int]] = ..., offset: _Optional[_Iterable[int]] = ..., length: _Optional[_Iterable[int]] = ...) -> None: ...

class ReadRangesResponse(_message.Message):
    __slots__ = ("buffer_id", "segment", "shm_dir", "nbytes")
    BUFFER_ID_FIELD_NUMBER: _ClassVar[int]
    SEGMENT_FIELD_NUMBER: _ClassVar[int]
    SHM_DIR_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    buffer_id: str
    segment: _common_pb2.SegmentRef
    shm_dir: str
    nbytes: int
    def __init__(self, buffer_id: _Optional[str] = ..., segment: _Optional[_Union[_common_pb2.SegmentRef, _Mapping]] = ..., shm_dir: _Optional[str] = ..., nbytes: _Optional[int] = ...) -> None: ...

class ReplicateRequest(_message.Message):
    __slots__ = ("key", "nodes", "all_nodes", "transport", "subscribers")
    KEY_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    ALL_NODES_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    SUBSCRIBERS_FIELD_NUMBER: _ClassVar[int]
    key: str
    nodes: _containers.RepeatedScalarFieldContainer[str]
    all_nodes: bool
    transport: str
    subscribers: bool
    def __init__(self, key: _Optional[str] = ..., nodes: _Optional[_Iterable[str]] = ..., all_nodes: _Optional[bool] = ..., transport: _Optional[str] = ..., subscribers: _Optional[bool] = ...) -> None: ...

class ReplicaResult(_message.Message):
    __slots__ = ("node_id", "status", "transport", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    status: str
    transport: str
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., status: _Optional[str] = ..., transport: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class ReplicateResponse(_message.Message):
    __slots__ = ("key", "results")
    KEY_FIELD_NUMBER: _ClassVar[int]
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    key: str
    results: _containers.RepeatedCompositeFieldContainer[ReplicaResult]
    def __init__(self, key: _Optional[str] = ..., results: _Optional[_Iterable[_Union[ReplicaResult, _Mapping]]] = ...) -> None: ...

class ExistsRequest(_message.Message):
    __slots__ = ("key",)
    KEY_FIELD_NUMBER: _ClassVar[int]
    key: str
    def __init__(self, key: _Optional[str] = ...) -> None: ...

class ExistsResponse(_message.Message):
    __slots__ = ("exists",)
    EXISTS_FIELD_NUMBER: _ClassVar[int]
    exists: bool
    def __init__(self, exists: _Optional[bool] = ...) -> None: ...

class DeleteRequest(_message.Message):
    __slots__ = ("key", "unless_held")
    KEY_FIELD_NUMBER: _ClassVar[int]
    UNLESS_HELD_FIELD_NUMBER: _ClassVar[int]
    key: str
    unless_held: bool
    def __init__(self, key: _Optional[str] = ..., unless_held: _Optional[bool] = ...) -> None: ...

class DeleteResponse(_message.Message):
    __slots__ = ("deleted", "versions")
    DELETED_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    deleted: bool
    versions: int
    def __init__(self, deleted: _Optional[bool] = ..., versions: _Optional[int] = ...) -> None: ...

class ListKeysRequest(_message.Message):
    __slots__ = ("prefix",)
    PREFIX_FIELD_NUMBER: _ClassVar[int]
    prefix: str
    def __init__(self, prefix: _Optional[str] = ...) -> None: ...

class ListKeysResponse(_message.Message):
    __slots__ = ("keys",)
    KEYS_FIELD_NUMBER: _ClassVar[int]
    keys: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, keys: _Optional[_Iterable[str]] = ...) -> None: ...

class PersistenceStatusRequest(_message.Message):
    __slots__ = ("task_id", "key", "wait_s")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    key: str
    wait_s: float
    def __init__(self, task_id: _Optional[str] = ..., key: _Optional[str] = ..., wait_s: _Optional[float] = ...) -> None: ...

class PersistenceShard(_message.Message):
    __slots__ = ("index", "tier", "target", "state", "progress", "done_bytes", "total_bytes", "attempts", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TIER_FIELD_NUMBER: _ClassVar[int]
    TARGET_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DONE_BYTES_FIELD_NUMBER: _ClassVar[int]
    TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    tier: str
    target: str
    state: str
    progress: float
    done_bytes: int
    total_bytes: int
    attempts: int
    error: str
    def __init__(self, index: _Optional[int] = ..., tier: _Optional[str] = ..., target: _Optional[str] = ..., state: _Optional[str] = ..., progress: _Optional[float] = ..., done_bytes: _Optional[int] = ..., total_bytes: _Optional[int] = ..., attempts: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class PersistenceStatusResponse(_message.Message):
    __slots__ = ("task_id", "key", "artifact_id", "state", "progress", "degraded_reason", "last_error", "last_error_code", "durable", "nbytes", "node_id", "created_unix_ms", "started_unix_ms", "finished_unix_ms", "shards")
    TASK_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    DEGRADED_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_CODE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_FIELD_NUMBER: _ClassVar[int]
    NBYTES_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    STARTED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    FINISHED_UNIX_MS_FIELD_NUMBER: _ClassVar[int]
    SHARDS_FIELD_NUMBER: _ClassVar[int]
    task_id: str
    key: str
    artifact_id: str
    state: str
    progress: float
    degraded_reason: str
    last_error: str
    last_error_code: str
    durable: bool
    nbytes: int
    node_id: str
    created_unix_ms: int
    started_unix_ms: int
    finished_unix_ms: int
    shards: _containers.RepeatedCompositeFieldContainer[PersistenceShard]
    def __init__(self, task_id: _Optional[str] = ..., key: _Optional[str] = ..., artifact_id: _Optional[str] = ..., state: _Optional[str] = ..., progress: _Optional[float] = ..., degraded_reason: _Optional[str] = ..., last_error: _Optional[str] = ..., last_error_code: _Optional[str] = ..., durable: _Optional[bool] = ..., nbytes: _Optional[int] = ..., node_id: _Optional[str] = ..., created_unix_ms: _Optional[int] = ..., started_unix_ms: _Optional[int] = ..., finished_unix_ms: _Optional[int] = ..., shards: _Optional[_Iterable[_Union[PersistenceShard, _Mapping]]] = ...) -> None: ...

class WaitLatestRequest(_message.Message):
    __slots__ = ("name", "after_key", "wait_s", "session_id")
    NAME_FIELD_NUMBER: _ClassVar[int]
    AFTER_KEY_FIELD_NUMBER: _ClassVar[int]
    WAIT_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    name: str
    after_key: str
    wait_s: float
    session_id: str
    def __init__(self, name: _Optional[str] = ..., after_key: _Optional[str] = ..., wait_s: _Optional[float] = ..., session_id: _Optional[str] = ...) -> None: ...

class WaitLatestResponse(_message.Message):
    __slots__ = ("key", "changed")
    KEY_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    key: str
    changed: bool
    def __init__(self, key: _Optional[str] = ..., changed: _Optional[bool] = ...) -> None: ...

class HoldVersionRequest(_message.Message):
    __slots__ = ("key", "ttl_s", "session_id")
    KEY_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    key: str
    ttl_s: float
    session_id: str
    def __init__(self, key: _Optional[str] = ..., ttl_s: _Optional[float] = ..., session_id: _Optional[str] = ...) -> None: ...

class HoldVersionResponse(_message.Message):
    __slots__ = ("hold_id", "key", "artifact_id")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_FIELD_NUMBER: _ClassVar[int]
    ARTIFACT_ID_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    key: str
    artifact_id: str
    def __init__(self, hold_id: _Optional[str] = ..., key: _Optional[str] = ..., artifact_id: _Optional[str] = ...) -> None: ...

class ReleaseHoldRequest(_message.Message):
    __slots__ = ("hold_id", "session_id")
    HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    SESSION_ID_FIELD_NUMBER: _ClassVar[int]
    hold_id: str
    session_id: str
    def __init__(self, hold_id: _Optional[str] = ..., session_id: _Optional[str] = ...) -> None: ...

class ReleaseHoldResponse(_message.Message):
    __slots__ = ("released",)
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    released: bool
    def __init__(self, released: _Optional[bool] = ...) -> None: ...

from tensorcast_ray._proto.tensorcast_ray.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class GlobalStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class DaemonRecord(_message.Message):
    __slots__ = ("node_id", "address", "version", "instance_id", "last_seen_unix_s")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_ID_FIELD_NUMBER: _ClassVar[int]
    LAST_SEEN_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    address: str
    version: str
    instance_id: str
    last_seen_unix_s: float
    def __init__(self, node_id: _Optional[str] = ..., address: _Optional[str] = ..., version: _Optional[str] = ..., instance_id: _Optional[str] = ..., last_seen_unix_s: _Optional[float] = ...) -> None: ...

class GlobalStatusResponse(_message.Message):
    __slots__ = ("version", "address", "metrics_address", "uptime_s", "keys", "artifacts", "daemons", "namespace", "pid")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    METRICS_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    KEYS_FIELD_NUMBER: _ClassVar[int]
    ARTIFACTS_FIELD_NUMBER: _ClassVar[int]
    DAEMONS_FIELD_NUMBER: _ClassVar[int]
    NAMESPACE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    version: str
    address: str
    metrics_address: str
    uptime_s: float
    keys: int
    artifacts: int
    daemons: _containers.RepeatedCompositeFieldContainer[DaemonRecord]
    namespace: str
    pid: int
    def __init__(self, version: _Optional[str] = ..., address: _Optional[str] = ..., metrics_address: _Optional[str] = ..., uptime_s: _Optional[float] = ..., keys: _Optional[int] = ..., artifacts: _Optional[int] = ..., daemons: _Optional[_Iterable[_Union[DaemonRecord, _Mapping]]] = ..., namespace: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

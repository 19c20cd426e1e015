"""Version of the SDK and the wire protocol.  [SDK, daemon, Global Store]"""

__version__ = "0.1.0"

#: Bumped on any incompatible change to ``proto/``. SDK, daemon and Global Store must agree.
PROTOCOL_VERSION = 2  # 2: write request ids, LeaseSegments.held, BeginWriteResponse.stageable

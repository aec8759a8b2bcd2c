"""The wire protocol, sans-IO: message types, the frame codec, the handshake.

Imports neither trio nor mlx: bytes in, events out, and back.
"""

PROTOCOL_ID = "dnet/2"
WS_PATH = "/dnet/2"

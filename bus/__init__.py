"""NATS: the connection, subject names, typed request/publish/serve, JetStream, embedded server."""

from . import subjects
from .connection import Bus, decode_message, decode_reply
from .embedded import EmbeddedNats, EmbeddedNatsError, find_nats_server

__all__ = [
    "Bus", "decode_message", "decode_reply", "subjects",
    "EmbeddedNats", "EmbeddedNatsError", "find_nats_server",
]

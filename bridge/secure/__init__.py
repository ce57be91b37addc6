"""Secure modes of grebe (issue 12): authenticated and encrypted peers. Contract: below."""

from bridge.secure.endpoint import Event, Roamed, SecureEndpoint, SessionStarted
from bridge.secure.keys import PeerSecurity, PeerSpec, SecurityMode, genkey, parse_security
from bridge.secure.limits import DROP_REASONS, EVENTS, Limits
from bridge.secure.wire import OVERHEAD, SECURE_PORT

__all__ = ["SecureEndpoint", "Event", "Roamed", "SessionStarted", "PeerSecurity", "PeerSpec",
           "SecurityMode", "genkey", "parse_security", "DROP_REASONS", "EVENTS", "Limits",
           "OVERHEAD", "SECURE_PORT"]

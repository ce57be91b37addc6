"""The userspace termination backend: selected TCP flows end in grebe's own TCP stack (stack/).

terminator.py (the Terminator: splices keyed by 4-tuple, fed by the Bridge), splice.py (two
TcpConnections back to back with the rule's inspector chain), legwire.py (the legs' IP framing:
plain packets and TUN frames), warm.py (keep-warm: a throw-away connection through a shadow),
admission.py (half-open caps, SYN cookies, the backend's metrics), deadlines.py (the splices'
timers in a heap), legicmp.py (ICMP errors about a server leg's segments).
"""

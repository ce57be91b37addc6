"""The userspace termination backend: selected TCP flows end in grebe's own TCP stack (stack/).

terminator.py (the Terminator: splices keyed by 4-tuple, fed by the Bridge), splice.py (two
TcpConnections back to back with the rule's inspector chain), legwire.py (the legs' IP framing:
plain packets and TUN frames), warm.py (keep-warm: a throw-away connection through a shadow),
bounds.py (half-open caps, SYN cookies, the memory budget, the splices' timers in a heap, the
backend's metrics).
"""

"""The kernel termination backend: nftables TPROXY, IP_TRANSPARENT sockets and a relay.

setup.py (the nftables table and policy routing, pure text and pyroute2 calls), relay.py (the
asyncio relay and `python -m bridge.kernel`), run.py (the backend on a thread of `grebe up`),
info.py (TCP_INFO of the relayed sockets for `grebe flows`).
"""

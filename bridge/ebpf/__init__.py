"""grebe's kernel fast path: a tc eBPF program (grebe_tc.c) for plain GRE/IPIP-in-UDP
forwarding, loaded with libbpf (libbpf.py), filled (maps.py), attached (attach.py) and
kept live (datapath.py) from Python. The Python path stays the reference and handles all
the program passes on. See docs/DESIGN.md, "The eBPF fast path"."""

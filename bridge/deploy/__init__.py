"""`grebe deploy INVENTORY.toml ACTION`: grebe on N hosts over SSH (inventory.py: the file and the
release, pure; remote.py: the SSH side, asyncssh).

    grebe deploy inventory.toml up        push the release and endpoint files, start or restart
    grebe deploy inventory.toml status    one line per host: what runs, its peers
    grebe deploy --example                an inventory to start from
"""

from __future__ import annotations

import argparse
import sys

from bridge.errors import ConfigError

__all__ = ["setup", "run"]


def setup(p: argparse.ArgumentParser) -> None:
    from bridge.deploy.remote import ACTIONS

    p.add_argument("inventory", nargs="?", help="inventory TOML (see --example)")
    p.add_argument("action", nargs="?", default="status", choices=ACTIONS,
                   help="up = push + start (restart what changed); default status")
    p.add_argument("--example", action="store_true", help="print an example inventory")


def run(args: argparse.Namespace) -> int:
    from bridge.deploy.inventory import EXAMPLE, load_inventory
    from bridge.deploy.remote import run_deploy

    if args.example:
        sys.stdout.write(EXAMPLE)
        return 0
    if not args.inventory:
        print("grebe deploy: an inventory file is needed (try --example)", file=sys.stderr)
        return 2
    try:
        inv = load_inventory(args.inventory)
    except OSError as e:
        print(f"grebe deploy: {e}", file=sys.stderr)
        return 1
    except ConfigError as e:
        print(f"grebe deploy: {args.inventory}: {e}", file=sys.stderr)
        return 1
    missing = [h for h in inv.hosts if not h.config.is_file()]
    if missing:
        for h in missing:
            print(f"grebe deploy: hosts.{h.name}.config: {h.config}: no such file",
                  file=sys.stderr)
        return 1

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    results = run_deploy(inv, args.action, say)
    for r in results:
        print(f"{r.name}: {'ok' if r.ok else 'FAILED'}: {r.summary}")
    return 0 if all(r.ok for r in results) else 1

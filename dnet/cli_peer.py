"""``python -m dnet.cli_peer``: the same as the ``dnet-peer`` script."""

from dnet.cli import peer_main

if __name__ == "__main__":
    raise SystemExit(peer_main())

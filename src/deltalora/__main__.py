"""``python -m deltalora``: the same CLI as the ``deltalora`` command."""

from deltalora.cli import main

main()

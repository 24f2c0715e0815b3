"""``churnguard-scoring``: the Faust worker (``churnguard-scoring worker -l info``)."""

from __future__ import annotations

import sys

from churnguard.scoring.app import create_app


def main() -> None:
    app = create_app()
    if len(sys.argv) == 1:
        sys.argv += ["worker", "--loglevel", "info"]
    app.main()


if __name__ == "__main__":
    main()

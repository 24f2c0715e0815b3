"""``python -m churnguard.common.events.schemas [--check]``: export or check the schemas."""

from churnguard.common.events.schemas import main

raise SystemExit(main())

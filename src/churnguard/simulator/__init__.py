"""``churnguard simulate``: a seeded B2B SaaS customer base with known outcomes.

:class:`~churnguard.simulator.world.World` steps the accounts a day at a time;
:mod:`.output` writes a world to a folder with its ground truth; :mod:`.http_sink` replays
it into the ingest API as product apps, the billing system and survey tools would.
"""

"""The processes, one folder each: worker (Celery, with beat), api, split (the split server), cli
(the `fleettune` command), local (demos, simulator, harness, services for tests and benches).

Each is thin glue over `fleettune.shared`; docs/architecture.md draws the layers.
"""

"""The Celery worker process and its beat: the app, the thin tasks over `shared.pipeline`, the
leader-leased beat, and the gateway's direct enqueue.

Starts with `fleettune worker [--beat]` (or `celery -A fleettune.workers.worker.app worker`).
"""

"""Celery glue: the app, thin tasks over `shared`, and the `fleettune` command."""

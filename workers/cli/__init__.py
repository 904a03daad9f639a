"""The `fleettune` command: process commands, the API's commands, and Redis-direct bootstrap.
"""

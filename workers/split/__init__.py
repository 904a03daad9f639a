"""The split-learning server process: the server part of a split model, over HTTP.

Starts with `fleettune split-server`.
"""

"""The round pipeline: ingest an update, fold it into partial sums, close a round (round inputs,
aggregation, publish), evaluate, distill, and retain what later rounds need.
"""

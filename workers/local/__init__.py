"""Local runs on one machine: the demos, the simulator, the experiment harness, and the real
services (Redis, Sentinel, SeaweedFS, workers, the API) that tests and benches start on free ports.
"""

"""`fleettune split-server`: the server's layers of split federations, behind the gateway.

Devices never reach it directly: the API authenticates a device, bounds its message and forwards
it here with the device's id and a secret shared through Redis. Per federation it holds one model
(the base with LoRA) and trains the LoRA of its layers (shared/split/server.py); every
`publish_every` steps it publishes that part as a version of its own. A restarted split server
resumes from the newest published part.
"""

from __future__ import annotations

import hmac
import logging
import threading

from fastapi import FastAPI, Header, Query, Request, Response
from starlette.concurrency import run_in_threadpool

from fleettune.shared import keys
from fleettune.shared.device import models, trainer
from fleettune.shared.errors import Refusal, Rejected
from fleettune.shared.runtime import Runtime
from fleettune.shared.split import config as split_config
from fleettune.shared.split import parts, wire
from fleettune.shared.split.wire import STEP_ID, shared_secret
from fleettune.shared.split.server import SplitServer
from fleettune.workers.api import problems

log = logging.getLogger(__name__)


class Servers:
    """One SplitServer per federation, built on first use and rebuilt when its split config changes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        self.lock = threading.Lock()
        self.servers: dict[str, tuple[str, SplitServer]] = {}

    def get(self, fed: str) -> SplitServer:
        r = self.runtime.redis
        config = split_config.load(r, fed)
        fed_config = self.runtime.state.federations.config(fed)
        if config is None or fed_config is None:
            raise Refusal(404, "split_not_configured", f"{fed} has no split-learning config")
        with self.lock:
            known = self.servers.get(fed)
            if known is not None and known[0] == config.to_json():
                return known[1]
            model = trainer.peft_model(models.load_model(config.base_model), fed_config.adapter)
            server = SplitServer(model, config)
            shapes = {k: tuple(v.shape) for k, v in server.weights().items()}
            lift_shapes = {k: tuple(v.shape) for k, v in server.lift_weights().items()}
            version, weights, lift = parts.load(r, self.runtime.store, fed, shapes, lift_shapes)
            if weights:
                trainer.load_adapter_weights(model, weights)
            server.load_lift(lift)
            log.info("%s: split server part at version %s (layers %s)", fed, version, list(server.layers))
            self.servers[fed] = (config.to_json(), server)
            return server


def create_split_app(runtime: Runtime) -> FastAPI:
    app = FastAPI(title="fleettune split server", version="1", docs_url=None)
    problems.install(app)
    servers = app.state.servers = Servers(runtime)  # in-process callers (the demo) evaluate through it
    secret = shared_secret(runtime.redis)
    r = runtime.redis

    def check(given: str) -> None:
        if not hmac.compare_digest(given.encode(), secret.hex().encode()):
            raise Refusal(401, "unauthenticated", "only the gateway may call the split server")

    def reserve(fed: str, device: str, server: SplitServer) -> None:
        """Count the device's step before its activations are read (a release the accountant counts,
        whatever follows), and refuse the one that would take it past the federation's epsilon budget.
        Counted atomically, so concurrent requests of one device cannot both slip under the budget."""
        with r.pipeline(transaction=False) as pipe:
            pipe.hincrby(keys.split_steps(fed), device, 1)
            pipe.hincrby(keys.split_state(fed), "steps", 1)
            taken, _ = pipe.execute()
        budget = server.config.max_epsilon
        if budget is not None and server.config.epsilon(taken) > budget:
            with r.pipeline(transaction=False) as pipe:
                pipe.hincrby(keys.split_steps(fed), device, -1)
                pipe.hincrby(keys.split_state(fed), "steps", -1)
                pipe.hincrby(keys.split_state(fed), "rejected:privacy_budget_exhausted", 1)
                pipe.execute()
            raise Refusal(403, "privacy_budget_exhausted",
                          f"{device} has taken {taken - 1} split steps: one more would pass epsilon {budget:g} "
                          f"(sigma {server.config.sigma:g}, q {server.config.sample_rate:g}, delta {server.config.delta:g})")

    def answer(fed: str, server: SplitServer, tensors: dict, headers: dict) -> Response:
        _maybe_publish(runtime, fed, server)
        return Response(wire.encode(tensors), media_type=wire.MEDIA_TYPE, headers=headers)

    def parsed(fed: str, body: bytes, shapes: dict, vocab: int | None, server: SplitServer | None = None) -> dict:
        try:
            got = wire.decode(body, shapes, vocab)
            if server is not None:
                server.admit(got["activations"])
            return got
        except Rejected as rejected:
            r.hincrby(keys.split_state(fed), f"rejected:{rejected.reason.value}", 1)
            raise Refusal(422, rejected.reason.value, rejected.detail) from None

    def two_part(fed: str, device: str, body: bytes, batch: int) -> Response:
        server = servers.get(fed)
        reserve(fed, device, server)
        got = parsed(fed, body, server.shapes(batch, with_labels=True), server.vocab, server)
        grad, loss = server.two_part(got["activations"], got["labels"])
        return answer(fed, server, {"grad": grad}, {"x-loss": repr(loss)})

    def forward(fed: str, device: str, body: bytes, batch: int) -> Response:
        server = servers.get(fed)
        reserve(fed, device, server)
        got = parsed(fed, body, server.shapes(batch, with_labels=False), None, server)
        step_id, residual = server.forward(device, got["activations"])
        return Response(wire.encode({"residual": residual}), media_type=wire.MEDIA_TYPE, headers={"x-step": step_id})

    def backward(fed: str, device: str, body: bytes, step_id: str) -> Response:
        server = servers.get(fed)
        got = parsed(fed, body, server.grad_shape(step_id), None)
        grad = server.backward(device, step_id, got["grad"])
        return answer(fed, server, {"grad": grad}, {})

    @app.post("/internal/{fed}/step")
    async def step_route(fed: str, request: Request, batch: int = Query(ge=1, le=1024),
                         x_fleettune_device: str = Header(), x_fleettune_secret: str = Header()) -> Response:
        check(x_fleettune_secret)
        return await run_in_threadpool(two_part, fed, x_fleettune_device, await request.body(), batch)

    @app.post("/internal/{fed}/forward")
    async def forward_route(fed: str, request: Request, batch: int = Query(ge=1, le=1024),
                            x_fleettune_device: str = Header(), x_fleettune_secret: str = Header()) -> Response:
        check(x_fleettune_secret)
        return await run_in_threadpool(forward, fed, x_fleettune_device, await request.body(), batch)

    @app.post("/internal/{fed}/backward")
    async def backward_route(fed: str, request: Request, step: str = Query(pattern=STEP_ID),
                             x_fleettune_device: str = Header(), x_fleettune_secret: str = Header()) -> Response:
        check(x_fleettune_secret)
        return await run_in_threadpool(backward, fed, x_fleettune_device, await request.body(), step)

    @app.get("/healthz")
    def healthz() -> dict:
        r.ping()
        return {"status": "ok"}

    return app


def _maybe_publish(runtime: Runtime, fed: str, server: SplitServer) -> None:
    if server.steps % server.config.publish_every:
        return
    with server.lock:
        weights = {k: v.clone() for k, v in server.weights().items()}
        lift = {k: v.clone() for k, v in server.lift_weights().items()}
    fed_config = runtime.state.federations.config(fed)
    version = parts.publish(runtime.redis, runtime.store, fed, weights,
                            parts.peft_config(server.config, fed_config.adapter, server.layers),
                            {"steps": server.steps, "layers": list(server.layers), "mode": server.config.mode,
                             "cut": server.config.cut, "sigma": server.config.sigma, "clip": server.config.clip,
                             "bottleneck": server.config.bottleneck}, lift)
    log.info("%s: published split server part %s after %s steps", fed, version, server.steps)


"""`fleettune demo`: devices that really train, on embedded defaults, through the production tasks."""

from __future__ import annotations

import dataclasses
import hashlib
import math
import shutil
import time
from pathlib import Path

import click
import numpy as np
import torch

from fleettune.shared import corpora, keys
from fleettune.shared.protocol import versions
from fleettune.shared.protocol.adapter_spec import AdapterConfig, ModelDims
from fleettune.shared.device import memory, models, trainer
from fleettune.shared.device.client import Device
from fleettune.shared.device.fleet import FleetSpec, build_fleet
from fleettune.shared.federation import DeviceFilter, EvaluationConfig, FederationConfig, RoundPolicy, LocalTraining
from fleettune import FleettuneAPIError
from fleettune.shared.secagg.config import SecureAggregation
from fleettune.shared.settings import Settings
from fleettune.shared.strategies.config import AggregationConfig
from fleettune.workers.local.harness import RoundRow, embedded, enroll, gateway, run_rounds

DEVICE_RAM_MB, DEVICE_STORAGE_MB = 4096, 16_000
# Per-device text and evaluation text: a real 135M model takes seconds per step on 2 cores, so it
# gets less of both to finish in minutes.
SIZES = {"tiny": (24_000, 12_000)}
LARGE_MODEL_SIZES = (4_000, 3_000)


SECURE_STAGE_S = 6.0  # --secure-aggregation: a stage waits this long for a device that vanished


def demo_config(name: str, model_source: str, dims: ModelDims, kind: str, rounds: int, num_devices: int,
                min_ram_mb: int, eval_chars: int, domains: tuple[str, ...], encoding: str = "float32",
                secure: bool = False) -> FederationConfig:
    adapter = (AdapterConfig(kind="prompt_tuning", num_virtual_tokens=16) if kind == "prompt_tuning"
               else AdapterConfig(kind=kind, rank=8, alpha=16, target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))
    return FederationConfig(
        name=name, model=dims, adapter=adapter, base_model=model_source,
        policy=RoundPolicy(min_updates=max(2, num_devices // 2), timeout_seconds=600, max_rounds=rounds,
                           max_update_norm=5.0),
        training=LocalTraining(learning_rate=1e-2 if kind == "prompt_tuning" else 5e-3, local_epochs=1,
                                  batch_size=8, seq_len=128, max_grad_norm=1.0, update_encoding=encoding),
        device_filter=DeviceFilter(min_ram_mb=min_ram_mb, min_storage_mb=100),
        evaluation=EvaluationConfig(base_model=model_source, general_every=1, eval_chars=eval_chars, domains=domains),
        aggregation=AggregationConfig(secure_aggregation=SecureAggregation(stage_timeout_s=SECURE_STAGE_S)
                                      if secure else None),
    )


def fresh_out_dir(out_dir: str | Path) -> Path:
    """The demo's output folder, emptied: each run's plot and adapter are its own."""
    out = Path(out_dir)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    return out


@dataclasses.dataclass(frozen=True)
class DemoRun:
    adapter_dir: Path
    heldout_ppl: float  # the final version's
    update_bytes: float  # the mean size of the honest devices' update objects
    secure_line: str = ""  # --secure-aggregation: the published version against plain FedAvg


def run_demo(settings: Settings, model_source: str = "tiny", kind: str = "lora", num_devices: int = 8,
             rounds: int = 5, out_dir: str | Path = "fleettune-demo",
             domains: tuple[str, ...] = corpora.DOMAINS, encoding: str = "float32", quiet: bool = False,
             secure: bool = False, formats: tuple[str, ...] = ()) -> DemoRun:
    """The demo federation; `encoding` is how devices code their updates, `quiet` prints nothing
    (the uncompressed reference run of `--compress`). `secure`: SecAgg+ rounds, in each of which one
    device vanishes after sharing its keys (the hostile device sits these out: its plain update
    would be refused before upload). `formats`: export the final version to these on-device formats."""
    say = (lambda *_a, **_k: None) if quiet else click.echo
    torch.set_num_threads(1)  # training here and evaluation in the worker thread: one core each
    out = fresh_out_dir(out_dir)
    started = time.monotonic()

    tokenizer = models.load_tokenizer(model_source)
    base = models.load_model(model_source, quantize_4bit=kind == "qlora")
    dims = ModelDims.from_hf_config(base.config)
    num_params = sum(p.numel() for p in base.parameters())
    device_chars, eval_chars = SIZES.get(model_source, LARGE_MODEL_SIZES)
    probe = demo_config("probe", model_source, dims, kind, rounds, num_devices, 0, eval_chars, domains)
    budget = memory.estimate(num_params, probe.spec.num_parameters, dims, bits=4 if kind == "qlora" else 32,
                             batch=8, seq=128, act_bytes=4)
    config = demo_config(f"demo-{int(time.time())}", model_source, dims, kind, rounds, num_devices,
                         min_ram_mb=math.ceil(budget.total / memory.MB), eval_chars=eval_chars, domains=domains,
                         encoding=encoding, secure=secure)
    model = trainer.peft_model(base, config.adapter)
    fleet = build_fleet(FleetSpec.spread(num_devices, device_chars, domains=domains), config, model, tokenizer,
                        ram_mb=DEVICE_RAM_MB, storage_mb=DEVICE_STORAGE_MB)
    devices = [device for device, _ in fleet]

    say(f"fleettune demo: {len(devices)} devices ({', '.join(sorted({d for _, d in fleet}))}) train "
               f"{'a 16-token soft prompt' if kind == 'prompt_tuning' else kind + ' r=8 on q/k/v/o'} of {model_source} "
               f"({num_params / 1e6:.2f} M parameters, {config.spec.num_parameters:,} trainable) for {rounds} rounds")
    say(f"memory budget per device: {budget.as_mb()} MB -> device filter min_ram_mb={config.device_filter.min_ram_mb}")
    with embedded(settings, out) as (app, runtime, broker), gateway(app, runtime) as (url, admin_key):
        runtime.state.federations.create(config, status="idle")
        # devices and the hostile one register through the API and then speak only to the gateway
        mallory = Device("mallory", config, model, devices[0].data, config.training, ram_mb=DEVICE_RAM_MB,
                         storage_mb=DEVICE_STORAGE_MB)
        old = Device("old-phone", config, model, devices[0].data, config.training,
                     ram_mb=config.device_filter.min_ram_mb // 2, storage_mb=DEVICE_STORAGE_MB)
        clients = enroll(url, admin_key, config.name, devices + ([old] if secure else [mallory, old]))
        runtime.coordinator.begin_training(config.name, rounds)
        try:
            clients["old-phone"].check_in(old.ram_mb, old.storage_mb)
        except FleettuneAPIError as refusal:
            say(f"old-phone at check-in: {refusal.status} {refusal.code}: {refusal.detail}")
        say(f"API {url}, broker {broker.split('@')[-1]}, store {type(runtime.store).__name__}; "
                   f"devices hold only their tokens\n")
        base_eval = runtime.evaluator(config).base
        rows = [RoundRow(0, "base", 0, 0, base_eval["heldout_mean"], base_eval["general"], math.nan, 0, 0, 0)]
        say(HEADER)
        say(_row(rows[0]))
        vanishing = {devices[-1].device_id}
        for row in run_rounds(app, runtime, config, devices, clients, rounds,
                              hostile=None if secure else clients["mallory"], progress=not quiet,
                              drop=(lambda _round: vanishing) if secure else None):
            rows.append(row)
            say(_row(row))
        final = int(runtime.state.federations.status(config.name)["version"])
        secure_line = secure_check(runtime, config, final, devices) if secure else ""
        if formats:
            from fleettune.workers.local.demo_exports import export_lines

            say(f"\nexporting version {final} for on-device runtimes (LoRA tensors are the graphs' inputs):")
            for line in export_lines(runtime, config, final, formats):
                say(line)
        stats = runtime.state.federations.stats(config.name)
        adapter_dir = out / "final-adapter"
        versions.download(runtime.store, config.name, final, adapter_dir)
        dead = runtime.state.accounting.deadletters(1)
        sizes = [runtime.store.digest(key)[1] for r in rows[1:] for d in devices
                 if runtime.store.exists(key := keys.update_object(config.name, r.round, d.device_id))]

    say(f"\ncounters: {stats}")
    if dead:
        say(f"last dead-letter: {dead[0]['device']} round {dead[0]['round']}: {dead[0]['reason']}")
    share = sum(r.send_seconds for r in rows[1:]) / max(sum(r.train_seconds for r in rows[1:]), 1e-9)
    say(f"federation overhead on a device (delta + encode + upload + submit): {100 * share:.2f}% of local training")
    plot = _plot(rows, out / "perplexity.png", model_source, kind)
    say(f"plot: {plot}")
    if not quiet:
        _check_final(model_source, adapter_dir, tokenizer)
    say(f"done in {time.monotonic() - started:.0f}s")
    if secure_line:
        say(secure_line)
    return DemoRun(adapter_dir, rows[-1].heldout_ppl, sum(sizes) / max(len(sizes), 1), secure_line)


def secure_check(runtime, config: FederationConfig, version: int, devices: list[Device]) -> str:
    """The last secure round's published step against plain FedAvg of the same clipped updates,
    which only this process (holding every device) can compute: the server never saw them."""
    manifest = versions.manifest(runtime.store, config.name, version)
    survivors = set(manifest["contributors"])
    limit, header = runtime.settings.max_update_bytes, runtime.settings.max_header_bytes
    new = versions.load_weights(runtime.store, config.name, version, config.spec, limit, header)
    old = versions.load_weights(runtime.store, config.name, manifest["parent_version"], config.spec, limit, header)
    names = sorted(config.update_tensors)
    step = np.concatenate([(new[k].double() - old[k].double()).numpy().ravel() for k in names])
    taking = [d.secure for d in devices if d.secure is not None and d.device_id in survivors]
    plain = sum(p.weight * p.update for p in taking) / sum(p.weight for p in taking)
    secure = manifest["aggregation"]["secure_aggregation"]
    # the fixed point's rounding, and float32 storage of the published weights
    bound = secure["mean_error_bound"] + 2.0 ** -23 * float(max(abs(new[k]).max() for k in names))
    diff = float(np.abs(step - plain).max())
    dropped = secure["dropped_after_sharing"]
    return (f"secure aggregation: max |difference from plain FedAvg| {diff:.3g} (bound {bound:.3g}), "
            f"dropped {dropped} of {dropped + len(survivors)}")


HEADER = (f"{'round':>5} {'status':>7} {'updates':>7} {'rejected':>8} {'held-out ppl':>12} "
          f"{'general ppl':>11} {'adapter norm':>12} {'train s/dev':>11} {'seconds':>7}")


def _row(r: RoundRow) -> str:
    return (f"{r.round:>5} {r.status:>7} {r.updates:>7} {r.rejected:>8} {r.heldout_ppl:>12.2f} "
            f"{r.general_ppl:>11.2f} {r.adapter_norm:>12.4f} {r.train_seconds:>11.2f} {r.seconds:>7.1f}"
            + (f"  {r.guard}" if r.guard else ""))


def run_compressed_demo(settings: Settings, encoding: str, out_dir: str | Path = "fleettune-demo", **kw) -> None:
    """`fleettune demo --compress ENCODING`: the demo with compressed updates, then the same
    federation with float32 updates (quietly, seeded alike), and the bytes and perplexity of the two."""
    run = run_demo(settings, encoding=encoding, out_dir=out_dir, **kw)
    click.echo("\nthe same federation with float32 updates, for reference ...")
    ref = run_demo(settings, encoding="float32", quiet=True, out_dir=Path(out_dir) / "float32-reference", **kw)
    click.echo(f"update bytes: float32 {ref.update_bytes:,.0f}, sent {run.update_bytes:,.0f} "
               f"(F/S = {ref.update_bytes / run.update_bytes:.2f}×); held-out perplexity {run.heldout_ppl:.2f} vs "
               f"{ref.heldout_ppl:.2f} uncompressed")


def _plot(rows: list[RoundRow], path: Path, model_source: str, kind: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    x = [r.round for r in rows]
    ax.plot(x, [r.heldout_ppl for r in rows], marker="o", label="held-out (fine-tuning domains)")
    ax.plot(x, [r.general_ppl for r in rows], marker="s", label="general text (forgetting)")
    ax.set_xlabel("round (0 = base model)")
    ax.set_ylabel("perplexity (log scale)")
    ax.set_yscale("log")
    ax.set_title(f"fleettune demo: federated {kind} on {model_source}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _check_final(model_source: str, adapter_dir: Path, tokenizer) -> None:
    """The published adapter is a real PEFT adapter: load it on a fresh base and compare outputs."""
    from peft import PeftModel

    base = models.load_model(model_source)
    ids = tokenizer("Permission is hereby granted, free of charge, to any person", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        before = base(ids).logits
        after = PeftModel.from_pretrained(base, str(adapter_dir)).eval()(ids).logits
    sha = hashlib.sha256((adapter_dir / versions.ADAPTER_FILE).read_bytes()).hexdigest()[:12]
    click.echo(f"final adapter {adapter_dir}/ (sha256 {sha}...) loads with PeftModel.from_pretrained; "
               f"max |logit change| on a test input: {(after - before).abs().max():.3f}")

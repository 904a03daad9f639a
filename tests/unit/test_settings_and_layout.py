import ast
import json
from pathlib import Path

import pytest

from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.errors import ConfigError
from fleettune.shared.federation import DeviceFilter, EvaluationConfig, FederationConfig, RoundPolicy
from fleettune.shared.settings import Settings
from fleettune.shared.strategies.config import AggregationConfig

ROOT = Path(__file__).resolve().parents[2]


def test_settings_come_from_the_environment():
    s = Settings.from_env({"FLEETTUNE_REDIS_URL": "redis://r:6379/1", "FLEETTUNE_S3_ENDPOINT": "s3:9000",
                           "FLEETTUNE_MAX_UPDATE_BYTES": "1024", "FLEETTUNE_TASK_TIME_LIMIT": "30"})
    assert (s.redis_url, s.s3_endpoint, s.max_update_bytes) == ("redis://r:6379/1", "s3:9000", 1024)
    assert s.visibility_timeout_s > s.task_time_limit_s == 30


def test_defaults_need_no_servers():
    s = Settings.from_env({})
    assert s.redis_url is None and s.s3_endpoint is None


def test_a_visibility_timeout_below_the_time_limit_is_refused():
    with pytest.raises(ConfigError, match="visibility timeout"):
        Settings.from_env({"FLEETTUNE_TASK_TIME_LIMIT": "60", "FLEETTUNE_VISIBILITY_TIMEOUT": "30"})
    with pytest.raises(ConfigError, match="integer"):
        Settings.from_env({"FLEETTUNE_MAX_UPDATE_BYTES": "lots"})


def test_a_bad_variable_is_named_with_its_value_and_what_is_allowed():
    cases = {
        "FLEETTUNE_MAX_RETRIES": ("x", "FLEETTUNE_MAX_RETRIES='x': must be an integer"),
        "FLEETTUNE_TASK_TIME_LIMIT": ("0", "FLEETTUNE_TASK_TIME_LIMIT='0': must be > 0"),  # an aliased name
        "FLEETTUNE_FOLD_IDLE": ("soon", "FLEETTUNE_FOLD_IDLE='soon': must be a number"),
        "FLEETTUNE_S3_SECURE": ("maybe", "FLEETTUNE_S3_SECURE='maybe': must be a boolean"),
        "FLEETTUNE_REDIS_MIN_REPLICAS": ("-1", "FLEETTUNE_REDIS_MIN_REPLICAS='-1': must be >= 0"),
        "FLEETTUNE_REDIS_SENTINELS": ("s1:26379,s2", "FLEETTUNE_REDIS_SENTINELS='s2': each address must be host:port"),
    }
    for name, (value, message) in cases.items():
        with pytest.raises(ConfigError) as err:
            Settings.from_env({name: value})
        assert str(err.value).startswith(message), str(err.value)
    with pytest.raises(ConfigError, match=r"FLEETTUNE_MESSAGE_TTL=60: .*FLEETTUNE_REDRIVE_AFTER=60"):
        Settings.from_env({"FLEETTUNE_MESSAGE_TTL": "60"})
    with pytest.raises(ConfigError, match=r"^max_retries='x': must be an integer$"):  # keywords: the field's name
        Settings(max_retries="x")


def test_the_environment_is_parsed_as_before():
    s = Settings.from_env({"FLEETTUNE_REDIS_SENTINELS": " s1:26379, s2:26379,", "FLEETTUNE_S3_SECURE": "yes",
                           "FLEETTUNE_DATA_DIR": "/var/ft", "FLEETTUNE_REDIS_URL": "", "FLEETTUNE_UNKNOWN": "x",
                           "FLEETTUNE_SWEEP_INTERVAL": "2.5", "FLEETTUNE_UPDATES_WRITE_ONCE": "false"})
    assert s.redis_sentinels == ("s1:26379", "s2:26379") and s.s3_secure and s.data_dir == Path("/var/ft")
    assert s.redis_url is None and s.sweep_interval_s == 2.5 and not s.updates_write_once  # empty: unset
    assert Settings.from_env({"FLEETTUNE_TASK_TIME_LIMIT": "400"}).visibility_timeout_s == 800
    assert Settings() == Settings.from_env({}) and Settings().visibility_timeout_s == 600
    assert Settings(redis_sentinels=("a:1",)).redis_sentinels == ("a:1",)
    with pytest.raises(Exception):
        Settings().redis_url = "redis://elsewhere"  # frozen
    with pytest.raises(ConfigError, match="is not a known field"):
        Settings(max_retry=3)


def test_round_policy_names_every_bad_value():
    with pytest.raises(ConfigError) as err:
        RoundPolicy(min_updates=0, server_lr=-1, max_update_norm=0)
    for text in ("min_updates", "server_lr", "max_update_norm"):
        assert text in str(err.value)


def test_the_1b_class_layout_has_the_expected_parameter_count():
    spec = build_spec(LAYOUTS["llama-1b"], AdapterConfig(rank=8))
    assert spec.num_parameters == 16 * (8 * 2048 * 4 + 8 * (2048 + 512 + 512 + 2048))
    assert spec.tensors["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == (512, 8)


def test_prompt_tuning_layout_is_one_embedding_table():
    spec = build_spec(LAYOUTS["tiny-llama"], AdapterConfig(kind="prompt_tuning", num_virtual_tokens=16))
    assert spec.tensors == {"prompt_embeddings": (16, 128)}


def test_federation_config_round_trips_through_json():
    c = FederationConfig("f", LAYOUTS["tiny-llama"], AdapterConfig(rank=4, target_modules=("q_proj", "v_proj")))
    assert FederationConfig.from_json(c.to_json()) == c
    full = FederationConfig("g", LAYOUTS["tiny-llama"], AdapterConfig(rank=8, tier_ranks=(("phone", 4),)),
                            evaluation=EvaluationConfig(domains=("code",)), device_filter=DeviceFilter(groups=("eu",)),
                            aggregation=AggregationConfig.preset("flexlora"), policy=RoundPolicy(max_update_norm=None))
    assert FederationConfig.from_json(full.to_json()) == full
    assert FederationConfig.from_json(full.to_json()).to_json() == full.to_json()


def test_a_config_stored_before_the_rename_still_loads():
    stored = json.loads(FederationConfig("f", LAYOUTS["tiny-llama"], policy=RoundPolicy(max_update_norm=2.5)).to_json())
    stored["policy"]["max_grad_norm"] = stored["policy"].pop("max_update_norm")  # as to_json wrote it then
    for section in ("training", "device_filter", "aggregation", "revision", "evaluation"):  # older still
        del stored[section]
    config = FederationConfig.from_json(json.dumps(stored))
    assert config.policy.max_update_norm == 2.5 and config.training == FederationConfig("f", config.model).training


def test_a_bad_stored_value_is_named_with_its_path_value_and_what_is_allowed():
    good = json.loads(FederationConfig("f", LAYOUTS["tiny-llama"]).to_json())
    cases = [
        (("policy", "min_updates"), "two", "policy.min_updates='two': must be an integer"),
        (("policy", "min_updates"), 0, "policy.min_updates=0: min_updates must be >= 1"),
        (("adapter", "kind"), "ia3", "adapter.kind='ia3': must be 'lora', 'qlora' or 'prompt_tuning'"),
        (("aggregation", "optimizer"), "lamb", "aggregation.optimizer='lamb': must be 'sgd', 'avgm', 'adam'"),
        (("training", "local_optimizer"), "rmsprop", "training.local_optimizer='rmsprop': must be 'adamw' or 'sgd'"),
        (("model", "hidden"), None, "model.hidden=None: must be an integer"),
        (("policy", "max_clip"), 1.0, "policy.max_clip=1.0: is not a known field"),
    ]
    for (section, field), value, message in cases:
        stored = json.loads(json.dumps(good))
        stored[section][field] = value
        with pytest.raises(ConfigError) as err:
            FederationConfig.from_json(json.dumps(stored))
        assert message in str(err.value), str(err.value)


def _imports(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            if node.module in ("fleettune.shared", "fleettune.workers"):  # `from fleettune.shared import keys`
                names |= {f"{node.module}.{a.name}" for a in node.names}
    return names


def _under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_shared_never_imports_celery_or_workers():
    offenders = {str(p): _under(_imports(p), "celery", "kombu", "fleettune.workers", "workers")
                 for p in (ROOT / "shared").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


# Each layer may import only the layers above it in this list (and the SDK, which speaks only HTTP).
# docs/architecture.md draws the same picture.
LAYERS = [
    ("base", ["errors", "settings", "keys", "storage", "redis_connect", "corpora"]),
    ("protocol", ["protocol"]),
    ("secure aggregation", ["secagg"]),
    ("strategies", ["strategies"]),
    ("config", ["federation"]),
    ("state", ["state"]),
    ("device", ["device"]),
    ("split", ["split"]),
    ("pipeline", ["pipeline"]),
    ("exports", ["export"]),
    ("control", ["control"]),
    ("composition", ["runtime", "metrics"]),
    ("worker", ["workers.worker"]),
    ("api", ["workers.api"]),
    ("split server", ["workers.split"]),
    ("local runs", ["workers.local"]),
    ("cli", ["workers.cli"]),
]


def _layer(module: str) -> int | None:
    """The layer of a fleettune module (None: the SDK or a third-party module)."""
    parts = module.split(".")
    if parts[:1] != ["fleettune"] or len(parts) < 3 or parts[1] not in ("shared", "workers"):
        return None
    name = parts[2] if parts[1] == "shared" else f"workers.{parts[2]}"
    if name == "sdk":
        return None
    found = [i for i, (_, members) in enumerate(LAYERS) if name in members]
    assert found, f"{module} belongs to no layer: add it to LAYERS"
    return found[0]


def test_every_import_runs_down_the_layers():
    offenders = []
    for path in [*(ROOT / "shared").rglob("*.py"), *(ROOT / "workers").rglob("*.py")]:
        if "sdk" in path.parts or path.name == "__init__.py" and path.parent.name in ("shared", "workers"):
            continue
        module = "fleettune." + ".".join(path.relative_to(ROOT).with_suffix("").parts)
        mine = _layer(module)
        for imported in _imports(path):
            theirs = _layer(imported)
            if theirs is not None and theirs > mine:
                offenders.append(f"{module} ({LAYERS[mine][0]}) imports {imported} ({LAYERS[theirs][0]})")
    assert offenders == []


def test_the_sdk_speaks_only_http():
    """The SDK (installed as `fleettune`) needs no server code: a device or operator installs it alone."""
    offenders = {str(p): _under(_imports(p), "fleettune.shared", "fleettune.workers", "shared", "workers", "redis",
                                "celery", "torch")
                 for p in (ROOT / "shared" / "sdk").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_nothing_uses_pickle_or_unsafe_torch_load():
    for path in list((ROOT / "shared").rglob("*.py")) + list((ROOT / "workers").rglob("*.py")):
        text = path.read_text()
        assert not _under(_imports(path), "pickle", "cloudpickle", "dill"), path
        assert "torch.load(" not in text or "weights_only=True" in text, path


def test_qlora_updates_have_the_lora_layout():
    lora = build_spec(LAYOUTS["tiny-llama"], AdapterConfig(kind="lora", rank=4))
    qlora = build_spec(LAYOUTS["tiny-llama"], AdapterConfig(kind="qlora", rank=4))
    assert qlora.tensors == lora.tensors and qlora.peft_config == lora.peft_config
    assert AdapterConfig(kind="qlora").quantized_base and not AdapterConfig().quantized_base
    with pytest.raises(ValueError, match="adapter kind"):
        AdapterConfig(kind="ia3")


def test_every_lua_script_is_loaded_and_shipped_in_the_wheel():
    import tomllib
    from importlib.resources import files

    from fleettune.shared.control import auth
    from fleettune.shared.state import accounting, ledger, lua, partials

    found = {f.name.removesuffix(".lua"): f.read_text(encoding="utf-8")
             for f in (files("fleettune.shared.state") / "lua").iterdir() if f.name.endswith(".lua")}
    loaded = [accounting._ACCEPT, partials._COMMIT, ledger._RECORD_AND_PUSH, auth._AUTHENTICATE_AND_COUNT.source]
    assert sorted(found.values()) == sorted(loaded)  # each file is some script, and none is left unused
    for name, source in found.items():
        assert lua.load_script(name) == source and source.startswith("--") and "KEYS" in source, name
    # a wheel carries only the data files that package-data names (matched with setuptools' glob)
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    for path in [*(ROOT / "shared").rglob("*.lua"), *(ROOT / "workers").rglob("*.lua")]:
        package = next(p for p in path.parents if (p / "__init__.py").exists())
        globs = package_data.get("fleettune." + ".".join(package.relative_to(ROOT).parts), [])
        assert any(path in package.glob(g) for g in globs), f"{path} is not in pyproject's package-data"


def test_the_keys_index_names_every_key():
    """keys.py's docstring is the one map of Redis and the store: every key it builds is listed there."""
    import inspect
    import re

    from fleettune.shared import keys

    listed = re.sub(r"\{[^}]*\}", "{}", keys.__doc__)
    missing = []
    for name, fn in inspect.getmembers(keys, inspect.isfunction):
        if fn.__module__ != keys.__name__ or name in ("valid_id", "check_id"):
            continue
        args = [777777 if p.annotation in (int, "int") else "xqx" for p in inspect.signature(fn).parameters.values()]
        key = fn(*args)
        if isinstance(key, str) and key.replace("777777", "{}").replace("xqx", "{}") not in listed:
            missing.append(name)
    missing += [n for n, v in vars(keys).items()
                if n.isupper() and isinstance(v, str) and v.startswith(keys.PREFIX + ":") and v not in listed]
    assert missing == []


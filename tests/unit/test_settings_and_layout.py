import ast
from pathlib import Path

import pytest

from fleettune.shared.protocol.adapter_spec import LAYOUTS, AdapterConfig, build_spec
from fleettune.shared.errors import ConfigError
from fleettune.shared.federation import FederationConfig, RoundPolicy
from fleettune.shared.settings import Settings

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


def test_round_policy_names_every_bad_value():
    with pytest.raises(ConfigError) as err:
        RoundPolicy(min_updates=0, server_lr=-1, max_grad_norm=0)
    for text in ("min_updates", "server_lr", "max_grad_norm"):
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


def _imports(path: Path) -> set[str]:
    """Every module a file imports, by its full dotted name."""
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def _under(names: set[str], *prefixes: str) -> set[str]:
    return {n for n in names if any(n == p or n.startswith(p + ".") for p in prefixes)}


def test_shared_never_imports_celery_or_workers():
    offenders = {str(p): _under(_imports(p), "celery", "kombu", "fleettune.workers", "workers")
                 for p in (ROOT / "shared").rglob("*.py")}
    assert {k: v for k, v in offenders.items() if v} == {}


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

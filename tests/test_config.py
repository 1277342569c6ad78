import dataclasses

import pytest
import yaml

from phase1_jax.config import DataConfig, ModelConfig, RunConfig, TrainConfig, load_run_config
from phase1_jax.errors import InvalidConfigError
from phase1_jax.presets import RUN_PRESETS, run_preset


def test_defaults_are_native_baseline():
    cfg = ModelConfig()
    assert cfg.numerics == "native" and cfg.phase1 is None and not cfg.is_phase1


@pytest.mark.parametrize("field,value,fragment", [
    ("d_model", 0, ">= 1"),
    ("numerics", "exact", "reference | native"),
    ("dropout", 1.0, "0 <= dropout < 1"),
    ("top_k", True, "integer"),
    ("n_seq", "128", "integer"),
    ("bk_direction", "sideways", "causal | bidirectional"),
])
def test_model_config_errors_name_field_value_and_allowed(field, value, fragment):
    with pytest.raises(InvalidConfigError) as info:
        ModelConfig(**{field: value})
    err = info.value
    assert err.param_name == f"model.{field}" and err.param_value == value
    assert fragment in str(err) and f"model.{field}" in str(err)


def test_reference_numerics_rejects_bidirectional():
    with pytest.raises(InvalidConfigError, match="bk_direction"):
        ModelConfig(numerics="reference", bk_direction="bidirectional")


def test_train_config_validation():
    with pytest.raises(InvalidConfigError, match="training.compute_dtype"):
        TrainConfig(compute_dtype="float16")
    with pytest.raises(InvalidConfigError, match="training.learning_rate"):
        TrainConfig(learning_rate=0.0)
    assert TrainConfig(learning_rate=1).learning_rate == 1.0  # an int where a float is expected is fine
    assert TrainConfig.from_dict(yaml.safe_load("learning_rate: 1e-3")).learning_rate == 1e-3  # YAML 1.1 str
    with pytest.raises(InvalidConfigError, match="training.learning_rate"):
        TrainConfig(learning_rate="fast")


def test_data_config_tokenizer_defaults_are_byte_level():
    cfg = DataConfig()
    assert (cfg.tokenizer, cfg.tokenizer_vocab_size, cfg.tokenizer_path) == ("byte", 8192, None)
    assert DataConfig(tokenizer="bpe", tokenizer_vocab_size=2048).tokenizer_vocab_size == 2048


@pytest.mark.parametrize("changes,field,fragment", [
    ({"tokenizer": "wordpiece"}, "data.tokenizer", "allowed: byte | bpe"),
    ({"tokenizer": "bpe", "tokenizer_vocab_size": 256}, "data.tokenizer_vocab_size", "257 <= x <= 262144"),
    ({"tokenizer_vocab_size": 10**6}, "data.tokenizer_vocab_size", "257 <= x <= 262144"),
    ({"tokenizer_vocab_size": "8k"}, "data.tokenizer_vocab_size", "an integer"),
    ({"tokenizer_path": "tok.json"}, "data.tokenizer_path", "null when data.tokenizer is 'byte'"),
    ({"source": "tokens", "path": "t.npy", "tokenizer": "bpe"}, "data.tokenizer_path",
     "the tokenizer.json that produced the token file"),
])
def test_data_config_tokenizer_errors_name_field_value_and_allowed(changes, field, fragment):
    with pytest.raises(InvalidConfigError) as info:
        DataConfig(**changes)
    err = info.value
    assert err.param_name == field and fragment in str(err) and "\n" not in str(err)


def test_bpe_with_a_token_file_and_its_tokenizer_is_valid():
    cfg = DataConfig(source="tokens", path="t.npy", tokenizer="bpe", tokenizer_path="tok.json")
    assert cfg.tokenizer_path == "tok.json"


def test_only_default_bpe_preset_is_bpe_and_its_sizes_agree():
    for name in RUN_PRESETS:
        cfg = run_preset(name)
        assert cfg.data.tokenizer == ("bpe" if name == "default-bpe" else "byte"), name
    bpe = run_preset("default-bpe")
    assert bpe.model.vocab_size == bpe.data.tokenizer_vocab_size == 8192
    assert bpe.model == run_preset("default").model.replace(vocab_size=8192)


@pytest.mark.parametrize("field,value,fragment", [
    ("optimizer", "sgd", "adamw | torch_adamw | torch_adam"),
    ("eps", 0.0, "> 0"),
    ("grad_clip_norm", -1.0, "null for no clipping"),
])
def test_optimizer_fields_validated(field, value, fragment):
    with pytest.raises(InvalidConfigError) as info:
        TrainConfig(**{field: value})
    assert info.value.param_name == f"training.{field}" and fragment in str(info.value)


def test_no_clipping_is_null_in_yaml():
    cfg = RunConfig.from_yaml("training:\n  grad_clip_norm: null\n  optimizer: torch_adamw\n  eps: 1e-6\n")
    assert cfg.training.grad_clip_norm is None and cfg.training.eps == 1e-6
    assert RunConfig.from_yaml(cfg.to_yaml()) == cfg
    assert TrainConfig().optimizer == "adamw" and TrainConfig().eps == 1e-8


def test_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        ModelConfig().d_model = 3


def test_yaml_round_trip_with_phase1_block():
    cfg = run_preset("tiny-phase1")
    text = cfg.to_yaml()
    assert "phase1:" in text and text.index("model:") < text.index("training:")
    again = RunConfig.from_yaml(text)
    assert again == cfg and again.model.phase1.htt_rank == cfg.model.phase1.htt_rank


def test_unknown_keys_rejected_with_allowed_list():
    with pytest.raises(InvalidConfigError) as info:
        RunConfig.from_dict({"model": {"d_modle": 8}})
    assert "model.d_modle" in str(info.value) and "d_model" in str(info.value)
    with pytest.raises(InvalidConfigError, match="top-level"):
        RunConfig.from_dict({"optimizer": {}})


def test_overrides_dotted_and_phase1_created_on_demand():
    cfg = run_preset("tiny").with_overrides({"training.steps": 3, "model.phase1.htt_rank": 4})
    assert cfg.training.steps == 3 and cfg.model.phase1.htt_rank == 4
    with pytest.raises(InvalidConfigError, match="unknown key"):
        run_preset("tiny").with_overrides({"training.stepz": 3})


def test_load_run_config_names_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  numerics: fast\n")
    with pytest.raises(InvalidConfigError) as info:
        load_run_config(str(path))
    assert "model.numerics" in str(info.value) and str(path) in str(info.value)


@pytest.mark.parametrize("name", sorted(RUN_PRESETS))
def test_presets_build_fresh_valid_configs(name):
    first, second = run_preset(name), run_preset(name)
    assert first == second and first is not second


def test_default_preset_is_phase1_and_unknown_preset_lists_names():
    assert run_preset("default").model.is_phase1
    assert not run_preset("tiny").model.is_phase1
    with pytest.raises(InvalidConfigError, match="tiny-phase1"):
        run_preset("huge")


def test_example_configs_in_repo_are_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "configs/ should hold example run configurations"
    for path in configs:
        load_run_config(str(path))


@pytest.mark.parametrize("name", sorted(RUN_PRESETS))
def test_preset_yaml_files_match_presets(name):
    from pathlib import Path

    path = Path(__file__).parents[1] / "configs" / f"{name}.yaml"
    assert load_run_config(str(path)) == run_preset(name), f"regenerate {path} from phase1_jax/presets.py"

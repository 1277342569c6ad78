"""save_checkpoint's extra files: written inside the atomic save, and only under plain, unreserved names."""

import pytest
from flax import nnx

from phase1_jax.checkpoint import load_checkpoint, save_checkpoint
from phase1_jax.config import ModelConfig, RunConfig
from phase1_jax.errors import CheckpointError
from phase1_jax.models.common import split_model
from phase1_jax.models.resnet_bk import ResNetBK


@pytest.fixture(scope="module")
def tiny_state():
    config = RunConfig(model=ModelConfig(d_model=8, n_layers=1, n_seq=8, num_experts=2))
    _, params, buffers = split_model(ResNetBK(config.model, rngs=nnx.Rngs(0)))
    return config, params, buffers


def test_extra_files_are_part_of_the_checkpoint(tiny_state, tmp_path):
    config, params, buffers = tiny_state
    ckpt = save_checkpoint(tmp_path / "ckpt", config, params, buffers, extra_files={"notes.bin": b"\x00\x01"})
    assert (ckpt / "notes.bin").read_bytes() == b"\x00\x01"
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # the staging directory was renamed, not copied
    assert load_checkpoint(ckpt)[0] == config


@pytest.mark.parametrize("name", ["meta.json", "config.yaml", "state", "../escape", "sub/file", "", ".."])
def test_reserved_or_nested_extra_file_names_are_refused_before_writing(tiny_state, tmp_path, name):
    config, params, buffers = tiny_state
    with pytest.raises(CheckpointError, match="is not allowed: a plain file name"):
        save_checkpoint(tmp_path / "ckpt", config, params, buffers, extra_files={name: b"x"})
    assert list(tmp_path.iterdir()) == []

"""The §6 benchmark (`phase1-jax bench`): its smoke run writes the JSON, the table and the plot; bad input is refused
before anything heavy runs. Timings on a CPU mean nothing and are not checked."""

import json

import pytest

from phase1_jax.cli import main


@pytest.mark.slow
def test_smoke_run_writes_json_table_and_plot(tmp_path):
    out = tmp_path / "bench"
    assert main(["bench", "--smoke", "--presets", "8gb", "--out", str(out)]) == 0
    result = json.loads((out / "phase1_bench.json").read_text())
    rows = {r["label"]: r for r in result["throughput"]["rows"]}
    assert set(rows) == {"baseline", "baseline + chunked loss", "8gb"}
    base, phase1 = rows["baseline"], rows["8gb"]
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["peak_bytes_compiled"] > 0
        assert sum(row["params"][k] for k in ("token_embedding", "position_embedding", "lm_head", "blocks",
                                              "final_norm")) == row["params"]["total"]
    # The compressed head and experts are really there: the Phase 1 model has fewer parameters where it should.
    assert phase1["params"]["lm_head"] < base["params"]["lm_head"] and phase1["params"]["total"] < base["params"]["total"]
    assert {m["what"] for m in result["throughput"]["micro"]} == {"embedding fwd+bwd", "sub-layer fwd+bwd"}
    assert [r["label"] for r in result["capped"]] == ["baseline", "8gb"]
    assert all(r["planner"]["predicted_largest_batch"] >= 1 for r in result["capped"])
    ppl = result["perplexity"]
    assert ppl["tokenizer"]["kind"] == "bpe" and [r["label"] for r in ppl["rows"]] == ["baseline", "8gb"]
    assert all(r["final_val_ppl"] > 1 and r["curve"] for r in ppl["rows"])
    assert "| 8gb |" in (out / "phase1_bench.md").read_text()
    assert (out / "phase1_bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,fragment", [
    (["--presets", "16gb"], "'--presets' = '16gb'"),
    (["--parts", "speed"], "'--parts' = 'speed'"),
    (["--shape", "768,12,2048"], "'--shape' = '768,12,2048'"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tmp_path, capsys, args, fragment):
    out = tmp_path / "bench"
    assert main(["bench", "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert fragment in err and err.count("\n") == 1
    assert not out.exists()


def test_a_shape_that_does_not_fit_the_device_is_refused_before_any_step(tmp_path, capsys, monkeypatch):
    import phase1_jax.bench as bench

    monkeypatch.setattr(bench, "device_memory_limit", lambda: 1024)  # a 1 KiB device
    ran = []
    monkeypatch.setattr(bench, "_chained_seconds", lambda *a, **k: ran.append(1) or 1.0)
    assert main(["bench", "--smoke", "--presets", "8gb", "--parts", "throughput", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "does not fit the device's 0.0 GiB" in err and "8gb needs" in err and not ran

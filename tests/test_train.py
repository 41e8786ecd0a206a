"""Training: the loss goes down, runs are reproducible and resumable, bad data is refused."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from seq2serve.cli import main
from seq2serve.config import ModelConfig
from seq2serve.train import train


def history(ckpt):
    return json.loads((ckpt / "trainer_state.json").read_text())["history"]


def test_a_short_run_lowers_the_loss_and_resumes_exactly(tmp_path):
    straight = tmp_path / "straight"
    train(straight, preset_name="tiny", steps=60, progress=False)
    # Interrupted after 25 steps, then resumed: the same weights as 60 straight (every step
    # draws from its own seeded generator, and the optimizer state is checkpointed).
    resumed = tmp_path / "resumed"
    train(resumed, preset_name="tiny", steps=60, progress=False, stop_after=25)
    assert json.loads((resumed / "trainer_state.json").read_text())["step"] == 25
    train(resumed, preset_name="tiny", steps=60, progress=False)
    a, b = (
        load_file(str(straight / "model.safetensors")),
        load_file(str(resumed / "model.safetensors")),
    )
    assert a.keys() == b.keys()
    for key in a:
        assert (a[key] - b[key]).abs().max().item() < 1e-5, key
    metrics = json.loads((straight / "metrics.json").read_text())
    assert 0 <= metrics["exact_match"] <= 1 and 0 <= metrics["accuracy"] <= 1
    assert (straight / "heldout.jsonl").exists()


def test_loss_decreases_over_training(tmp_path):
    out = tmp_path / "run"
    train(out, preset_name="tiny", steps=90, progress=False)
    losses = [h["lm_loss"] for h in history(out)]
    assert losses[-1] < losses[0]


def test_training_on_a_user_file(tmp_path):
    data = tmp_path / "pairs.tsv"
    rows = [
        f"add {i} {j}\t{i + j}\t{'even' if (i + j) % 2 == 0 else 'odd'}"
        for i in range(20)
        for j in range(20)
    ]
    data.write_text("\n".join(rows) + "\n", encoding="utf-8")
    out = tmp_path / "user"
    assert (
        main(["train", "--out", str(out), "--data", str(data), "--preset", "tiny", "--steps", "20"])
        == 0
    )
    cfg = ModelConfig.load(out / "config.json")
    assert cfg.labels == ("even", "odd")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"a\tb\n\nc\td\n", "pairs.tsv:2"),
        (b"a\tb\nonly-source\n", "pairs.tsv:2"),
        (b"a\tb\n\xff\xfe\tx\n", "pairs.tsv:2"),
    ],
)
def test_bad_data_is_refused_naming_file_and_line(tmp_path, capsys, content, message):
    data = tmp_path / "pairs.tsv"
    data.write_bytes(content)
    out = tmp_path / "never"
    assert main(["train", "--out", str(out), "--data", str(data), "--preset", "tiny"]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists(), "a failed run must not leave a half-written checkpoint"

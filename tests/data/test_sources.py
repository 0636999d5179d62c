"""Records from Parquet, CSV and Hugging Face datasets by name (a local dataset directory; never the network)."""

import csv
import json
import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.conftest import REPO
from tracetune.data.sources import describe
from tracetune.data.traces import load_eval_items, load_traces

ROWS = [json.loads(line) for line in (REPO / "data" / "train.jsonl").read_text().splitlines()[:12]]


def _gsm8k(rows):
    return [{"question": r["prompt"], "answer": "\n".join(s["content"] for s in r["steps"]) + f"\n#### {r['final_answer']}"} for r in rows]  # fmt: skip


@pytest.fixture
def hub_dir(tmp_path):
    """A dataset directory as `datasets.load_dataset` reads one: a train split in Parquet."""
    folder = tmp_path / "mini-gsm8k"
    folder.mkdir()
    pq.write_table(pa.Table.from_pylist(_gsm8k(ROWS)), folder / "train-00000-of-00001.parquet")
    return folder


def test_parquet_and_csv_go_through_the_same_detection_and_adapters(tmp_path):
    pq.write_table(pa.Table.from_pylist(_gsm8k(ROWS)), tmp_path / "t.parquet")
    with open(tmp_path / "t.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=["id", "prompt", "steps", "final_answer"])
        writer.writeheader()
        for r in ROWS:
            writer.writerow({"id": r["id"], "prompt": r["prompt"], "steps": json.dumps(r["steps"]), "final_answer": r["final_answer"]})  # fmt: skip
    parquet, table = load_traces(tmp_path / "t.parquet"), load_traces(tmp_path / "t.csv")
    assert (parquet.format, table.format) == ("gsm8k", "native") and not parquet.errors and not table.errors
    assert (
        [t.final_answer for t in parquet.records]
        == [t.final_answer for t in table.records]
        == [r["final_answer"] for r in ROWS]
    )
    assert table.records[0].steps[0].content == ROWS[0]["steps"][0]["content"]


def test_a_bad_row_is_named_by_its_row_number(tmp_path):
    rows = _gsm8k(ROWS)
    rows[2]["question"] = ""
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet")
    (issue,) = load_traces(tmp_path / "bad.parquet").errors
    assert issue.line == 3 and issue.field == "prompt" and str(tmp_path / "bad.parquet") in str(issue)


def test_a_dataset_by_name_loads_and_is_described_by_fingerprint(hub_dir):
    source = f"hf:{hub_dir}:train"
    report = load_traces(source)
    assert report.format == "gsm8k" and len(report.records) == len(ROWS) and not report.errors
    assert len(load_eval_items(source).records) == len(ROWS)
    info = describe(source)
    assert info["dataset"] == str(hub_dir) and info["split"] == "train" and info["num_rows"] == len(ROWS)
    assert info["fingerprint"] and describe(source) == info


@pytest.mark.slow
def test_a_run_on_a_hub_dataset_records_it_in_place_of_a_file_hash(hub_dir, tmp_path):
    from tests.conftest import tiny_run_args
    from tracetune.cli import main

    args = tiny_run_args(tmp_path, "output.run_name=hub", f"data.train_file=hf:{hub_dir}:train", "data.val_fraction=0")
    assert main([*args, "train.max_steps=2", "train.eval_every_steps=null", "eval.run_base=false"]) == 0
    run = json.loads((tmp_path / "hub" / "run.json").read_text())
    assert run["datasets"][f"hf:{hub_dir}:train"]["num_rows"] == len(ROWS)
    assert f"hf:{hub_dir}:train" not in run["data_sha256"]


def test_a_malformed_name_is_a_config_error(tiny_cfg):
    from tracetune.errors import ConfigError

    with pytest.raises(ConfigError, match=r"data\.train_file: a Hub dataset is hf:NAME:SPLIT"):
        tiny_cfg("data.train_file=hf:only-a-name")


def test_a_dataset_not_in_the_cache_offline_says_how_to_provide_it():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": "/nonexistent-hf-home"}
    result = subprocess.run(
        [sys.executable, "-m", "tracetune", "data", "validate", "hf:nobody/no-such-dataset:train"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 2
    assert "could not load 'nobody/no-such-dataset'" in result.stderr and "HF_HUB_OFFLINE=1" in result.stderr

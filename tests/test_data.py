"""Sample data, ingest into Deep Lake from every kind of source, column-selective streaming."""

import gzip
import json

import pytest

from conftest import SHARED
from rlhf_lib.config import DatasetSource
from rlhf_lib.data import formatting, lake, sample


def test_sample_data_is_deterministic_and_in_seed_schemas():
    a = list(sample.openorca_rows(20, "train", 1))
    assert a == list(sample.openorca_rows(20, "train", 1))
    assert a != list(sample.openorca_rows(20, "train", 2))
    assert set(a[0]) == {"id", "system_prompt", "question", "response"}
    pair = next(sample.hh_rlhf_rows(1, "train", 1))
    assert set(pair) == {"chosen", "rejected"}
    assert pair["chosen"].startswith("\n\nHuman: ") and "\n\nAssistant: " in pair["chosen"]
    assert set(next(sample.alpaca_orca_rows(1, "train", 1))) == {"instruction", "input", "output"}


def test_held_out_questions_never_appear_in_training_pools():
    train = {q for q, _ in sample.facts("train")}
    held_out = {q for q, _ in sample.facts("eval")}
    assert held_out and train and not train & held_out
    assert {r["instruction"] for r in sample.alpaca_orca_rows(200, "eval", 3)} <= held_out


def test_preference_is_learnable_from_politeness():
    """Chosen answers never contain a rude phrase; every rude answer is a rejected one."""
    rude = sample.RUDE_OPENERS + sample.RUDE_CLOSERS
    pairs = list(sample.hh_rlhf_rows(300, "train", 0))
    assert not any(any(r in p["chosen"] for r in rude) for p in pairs)
    assert sum(any(r in p["rejected"] for r in rude) for p in pairs) > 100


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_ingest_jsonl_carves_eval_and_streams_selected_columns(tmp_path):
    rows = [{"id": i, "question": f"q{i}", "response": f"r{i}", "system_prompt": "", "extra": "x"} for i in range(50)]
    src = DatasetSource(source=str(_jsonl(tmp_path / "sft.jsonl", rows)), eval_rows=10, max_rows=30)
    train = lake.materialise("sft", src, "train", tmp_path / "store", seed=0, sample_rows=100)
    held = lake.materialise("sft", src, "eval", tmp_path / "store", seed=0, sample_rows=100)
    assert (train["rows"], held["rows"]) == (30, 10)
    assert train["columns"] == ["question", "response", "system_prompt"]  # `extra` is not carried over
    streamed = list(lake.stream(train["uri"], ["question"]))
    assert streamed[0] == {"question": "q10"} and len(streamed) == 30  # training starts after the eval carve
    assert [r["question"] for r in lake.stream(held["uri"], ["question"])] == [f"q{i}" for i in range(10)]
    again = lake.materialise("sft", src, "train", tmp_path / "store", seed=0, sample_rows=100)
    assert again["uri"] == train["uri"]


def test_ingest_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"instruction": [f"do {i}" for i in range(12)], "input": [""] * 12, "output": ["ok"] * 12})
    pq.write_table(table, tmp_path / "prompts.parquet")
    src = DatasetSource(source=str(tmp_path / "prompts.parquet"), eval_rows=2)
    info = lake.materialise("prompts", src, "train", tmp_path / "store", seed=0, sample_rows=100)
    assert info["rows"] == 10
    assert next(lake.stream(info["uri"], ["instruction", "input"])) == {"instruction": "do 2", "input": ""}


def test_missing_column_names_the_column(tmp_path):
    src = DatasetSource(source=str(_jsonl(tmp_path / "p.jsonl", [{"chosen": "a", "reject": "b"}] * 3)), eval_rows=1)
    with pytest.raises(lake.DataError, match=r"rejected"):
        lake.materialise("preference", src, "train", tmp_path / "store", seed=0, sample_rows=10)
    assert not any((tmp_path / "store" / "datasets").iterdir())  # nothing half-written is kept


def test_existing_deep_lake_dataset_is_a_source(tmp_path):
    src = DatasetSource(source=str(_jsonl(tmp_path / "sft.jsonl", [{"question": "q", "response": "r"}] * 5)),
                        eval_rows=1)
    first = lake.materialise("sft", src, "train", tmp_path / "a", seed=0, sample_rows=10)
    again = lake.materialise("sft", DatasetSource(source=first["uri"], eval_rows=1), "train", tmp_path / "b",
                             seed=0, sample_rows=10)
    assert again["rows"] == 3


@pytest.mark.skipif(not (SHARED / "data").exists(), reason="../shared/data is not beside this checkout")
def test_real_hh_rlhf_pairs_ingest(tmp_path):
    src = DatasetSource(source=str(SHARED / "data" / "hh_rlhf_pairs_2666.jsonl.gz"), eval_rows=100, max_rows=400)
    info = lake.materialise("preference", src, "train", tmp_path / "store", seed=0, sample_rows=10)
    assert info["rows"] == 400
    row = next(lake.stream(info["uri"], ["chosen"]))
    qa = formatting.hh_to_qa(row["chosen"])
    assert qa.startswith("Question: ") and "\n\nAnswer: " in qa
    with gzip.open(SHARED / "data" / "hh_rlhf_pairs_2666.jsonl.gz", "rt") as fh:
        raw = [json.loads(line) for _, line in zip(range(101), fh)]
    assert row["chosen"] == raw[100]["chosen"]


def test_prompt_tokens_are_a_prefix_of_the_training_text(tiny_policy):
    """Generation starts exactly where SFT examples continue: no lone-space token at the prompt's end."""
    from rlhf_lib.models import load_tokenizer

    tok = load_tokenizer(tiny_policy)
    row = {"question": "What is the capital of Peru?", "response": "The capital of Peru is Lima."}
    full = tok(formatting.sft_text(row))["input_ids"]
    prompt = tok(formatting.prompt(row["question"]))["input_ids"]
    assert full[: len(prompt)] == prompt
    assert formatting.sft_text(row) == "Question: What is the capital of Peru?\n\nAnswer: The capital of Peru is Lima."

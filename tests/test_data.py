"""Instruction data: synthetic set, sources and partition, tokenizer, response-only tokenization."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec
import pytest
from services import require_shared_data

from unitedllm.config.types import Config
from unitedllm.errors import ConfigError
from unitedllm.training.data import (
    IGNORE_INDEX,
    client_data,
    format_prompt,
    tokenize_records,
    tokenizer_corpus,
)
from unitedllm.training.sources import client_records, read_records, server_test_records, training_records
from unitedllm.training.synthetic import CATEGORIES, generate_records
from unitedllm.training.tokenizer import load_tokenizer, train_tokenizer


def make_cfg(tmp_path: Path, **sections: dict[str, Any]) -> Config:
    raw: dict[str, Any] = {
        "data_args": {
            "dataset": "unitedllm-synthetic",
            "dataset_name": None,
            "synthetic_num_examples": 240,
            "test_dataset_size": 24,
            "max_seq_length": 256,
            "cache_dir": str(tmp_path / "cache"),
        },
        "model_args": {"train_tokenizer_vocab_size": 320},
        "train_args": {"client_num_in_total": 3},
    }
    for section, values in sections.items():
        raw.setdefault(section, {}).update(values)
    return msgspec.convert(raw, Config)


def write_jsonl(path: Path, records: list[dict[str, str]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_synthetic_records_are_deterministic_and_cover_every_category() -> None:
    a = generate_records(120, seed=7)
    assert a == generate_records(120, seed=7)
    assert a != generate_records(120, seed=8)
    assert {r["category"] for r in a} == set(CATEGORIES)
    assert all(set(r) == {"instruction", "context", "response", "category"} for r in a)
    adds = [r for r in a if r["category"] == "addition"]
    for r in adds:  # the pattern is what the model must learn: check it is right
        x, y = r["instruction"].removeprefix("What is ").removesuffix("?").split(" plus ")
        assert r["response"] == str(int(x) + int(y))


def test_category_partition_gives_clients_disjoint_categories(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    seen: list[set[str]] = []
    for rank in (1, 2, 3):
        train, test = client_records(cfg, rank)
        cats = {r["category"] for r in train}
        assert len(cats) == 2
        assert {r["category"] for r in test} <= cats
        seen.append(cats)
    assert seen[0].isdisjoint(seen[1]) and seen[1].isdisjoint(seen[2]) and seen[0].isdisjoint(seen[2])
    assert set().union(*seen) == set(CATEGORIES)
    # Every rank computes the same split: the aggregator's test set is the clients' test sets together.
    all_test = server_test_records(cfg)
    assert len(all_test) == 24
    assert sorted(map(json.dumps, all_test)) == sorted(
        json.dumps(r) for rank in (1, 2, 3) for r in client_records(cfg, rank)[1]
    )


def test_iid_partition_mixes_categories(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, data_args={"partition": "iid"})
    train, _ = client_records(cfg, 1)
    assert {r["category"] for r in train} == set(CATEGORIES)


def test_more_clients_than_categories_share_categories(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, train_args={"client_num_in_total": 12})
    first, seventh = client_records(cfg, 1)[0], client_records(cfg, 7)[0]
    assert {r["category"] for r in first} == {r["category"] for r in seventh}
    # The two clients split that category's records between them (duplicates in content are allowed).
    (category,) = {r["category"] for r in first}
    assert first and seventh
    assert len(first) + len(seventh) == sum(r["category"] == category for r in training_records(cfg))


def test_labels_cover_only_the_response(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    tok = load_tokenizer(cfg)
    record = {
        "instruction": "Reverse the letters of the word.",
        "context": "apple",
        "response": "elppa",
        "category": "reverse",
    }
    ds = tokenize_records([record], tok, cfg)
    ids, labels = ds[0]["input_ids"], ds[0]["labels"]
    n_prompt = len(tok(format_prompt(record), add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
    assert tok.decode(labels[n_prompt:]) == "elppa" + tok.eos_token
    assert ids[n_prompt:] == labels[n_prompt:]
    assert "### Input:\napple" in tok.decode(ids)
    no_context = dict(record, context="")
    assert "### Input" not in format_prompt(no_context)


def test_long_sequences_are_removed_or_truncated(tmp_path: Path) -> None:
    short = {"instruction": "What is 1 plus 2?", "context": "", "response": "3", "category": "addition"}
    long = {
        "instruction": "Say it.",
        "context": "",
        "response": " ".join(["apple river"] * 80),
        "category": "long",
    }
    cfg = make_cfg(tmp_path, data_args={"max_seq_length": 200, "remove_long_seq": True})
    tok = load_tokenizer(cfg)
    kept = tokenize_records([short, long], tok, cfg)
    assert kept["category"] == ["addition"]

    cfg = make_cfg(
        tmp_path, data_args={"max_seq_length": 200, "remove_long_seq": False, "truncate_long_seq": True}
    )
    cut = tokenize_records([short, long], tok, cfg)
    assert cut["category"] == ["addition", "long"]
    assert max(len(x) for x in cut["input_ids"]) == 200
    assert len(cut[1]["labels"]) == 200


def test_long_sequences_kept_whole_when_neither_rule_is_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # FedML accepts remove_long_seq and truncate_long_seq both false: long examples stay whole, with a warning.
    short = {"instruction": "What is 1 plus 2?", "context": "", "response": "3", "category": "addition"}
    long = {
        "instruction": "Say it.",
        "context": "",
        "response": " ".join(["apple river"] * 80),
        "category": "long",
    }
    cfg = make_cfg(
        tmp_path, data_args={"max_seq_length": 200, "remove_long_seq": False, "truncate_long_seq": False}
    )
    with caplog.at_level(logging.WARNING, logger="unitedllm.training.data"):
        whole = tokenize_records([short, long], load_tokenizer(cfg), cfg)
    assert whole["category"] == ["addition", "long"]
    assert len(whole[1]["input_ids"]) > 200
    assert "1 of 2 examples are longer than data_args.max_seq_length (200)" in caplog.text


def test_tokenizer_training_is_deterministic_and_cached(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    texts = tokenizer_corpus(cfg)
    a = train_tokenizer(texts, 320, tmp_path / "a")
    b = train_tokenizer(texts, 320, tmp_path / "b")
    assert len(a) == 320
    assert a.get_vocab() == b.get_vocab()
    sample = format_prompt(generate_records(1, seed=3)[0])
    assert a(sample)["input_ids"] == b(sample)["input_ids"]
    assert a.decode(a(sample)["input_ids"]) == sample
    assert a.eos_token == a.bos_token == "<|endoftext|>" and a.pad_token == "<|padding|>"
    assert len(list((tmp_path / "a" / "tokenizers").iterdir())) == 1
    again = train_tokenizer(texts, 320, tmp_path / "a")  # from the cache
    assert again.get_vocab() == a.get_vocab()


def test_tokenizer_vocab_too_small_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="train_tokenizer_vocab_size.*at least 258"):
        load_tokenizer(make_cfg(tmp_path, model_args={"train_tokenizer_vocab_size": 100}))


def test_malformed_jsonl_names_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "c", "resp\n')
    with pytest.raises(ConfigError, match=r"data_args.dataset_path\[0\].*bad.jsonl:2: not valid JSON"):
        read_records(bad, config_path="data_args.dataset_path[0]")
    missing_field = tmp_path / "nofield.jsonl"
    missing_field.write_text('{"instruction": "a"}\n')
    with pytest.raises(ConfigError, match=r"nofield.jsonl:1: field 'response'"):
        read_records(missing_field, config_path="data_args.dataset_path[0]")


def test_missing_data_file_is_a_config_error(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, data_args={"dataset": "dolly", "dataset_path": [str(tmp_path / "nope.jsonl")]})
    with pytest.raises(ConfigError, match=r"data_args.dataset_path\[0\]: data file not found.*nope.jsonl"):
        client_records(cfg, 1)


def test_two_files_are_train_and_test(tmp_path: Path) -> None:
    records = generate_records(60, seed=1)
    train = write_jsonl(tmp_path / "train.jsonl", records[:48])
    test = write_jsonl(tmp_path / "test.jsonl", records[48:])
    cfg = make_cfg(tmp_path, data_args={"dataset": "dolly", "dataset_path": [str(train), str(test)]})
    assert sorted(map(json.dumps, server_test_records(cfg))) == sorted(map(json.dumps, records[48:]))
    client_train = [r for rank in (1, 2, 3) for r in client_records(cfg, rank)[0]]
    assert sorted(map(json.dumps, client_train)) == sorted(map(json.dumps, records[:48]))


def test_client_files_are_expanded_by_rank(tmp_path: Path) -> None:
    for rank in (1, 2):
        write_jsonl(
            tmp_path / f"client_{rank}.jsonl",
            [
                {
                    "instruction": f"Who are you {i}?",
                    "context": "",
                    "response": f"client {rank}",
                    "category": f"c{rank}",
                }
                for i in range(20)
            ],
        )
    cfg = make_cfg(
        tmp_path,
        data_args={
            "dataset": "dolly",
            "client_dataset_path": [str(tmp_path / "client_{rank}.jsonl")],
            "test_dataset_size": 4,
        },
        train_args={"client_num_in_total": 2},
    )
    train, test = client_records(cfg, 2)
    assert (len(train), len(test)) == (16, 4)
    assert {r["response"] for r in train + test} == {"client 2"}
    assert len(server_test_records(cfg)) == 8
    assert len(tokenizer_corpus(cfg)) == 32


def test_test_set_larger_than_data_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="data_args.test_dataset_size: 500 leaves no training data"):
        client_records(make_cfg(tmp_path, data_args={"test_dataset_size": 500}), 1)


def test_client_data_is_cached_on_disk(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    tok = load_tokenizer(cfg)
    train, _test = client_data(cfg, 1, tok)
    files = sorted((tmp_path / "cache" / "datasets").glob("*.arrow"))
    assert len(files) == 2
    again, _ = client_data(cfg, 1, tok)
    assert again["input_ids"] == train["input_ids"]
    assert sorted((tmp_path / "cache" / "datasets").glob("*.arrow")) == files


def test_pythia_tokenizer_dir_without_config_loads(tmp_path: Path) -> None:
    shared = require_shared_data("pythia/tokenizer.json")
    cfg = make_cfg(
        tmp_path,
        model_args={"train_tokenizer_vocab_size": None, "model_name_or_path": str(shared / "pythia")},
    )
    tok = load_tokenizer(cfg)
    assert tok.eos_token == "<|endoftext|>"
    assert tok.pad_token == tok.eos_token
    assert tok.decode(tok("What is 3 plus 4?")["input_ids"]) == "What is 3 plus 4?"


def test_dolly_file_splits_by_category() -> None:
    path = require_shared_data("dolly/databricks-dolly-15k.jsonl") / "dolly" / "databricks-dolly-15k.jsonl"
    cfg = msgspec.convert(
        {
            "data_args": {"dataset_path": [str(path)], "test_dataset_size": 200},
            "train_args": {"client_num_in_total": 2},
        },
        Config,
    )
    a, b = client_records(cfg, 1)[0], client_records(cfg, 2)[0]
    assert {r["category"] for r in a}.isdisjoint({r["category"] for r in b})
    assert len(a) + len(b) == 15011 - 200

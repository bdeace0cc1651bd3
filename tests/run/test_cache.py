"""Tokenize once: a second encoding of the same split with the same tokenizer and settings comes from the cache;
any change to the data, the tokenizer or the settings makes a new entry."""

from __future__ import annotations

import pytest
from conftest import data_args

from launch.run.cache import cache_key, encode_cached
from launch.run.config import resolve


@pytest.fixture
def parts(models, data, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("FTCTL_CACHE", str(tmp_path / "cache"))

    def make(*extra: str):
        task = resolve(["--task", "sst2", *data_args(data), *extra], prog="test").task
        splits = task.load().splits
        task = task.bind(state=task.check_data(splits, training=True))
        return task, splits["train"], AutoTokenizer.from_pretrained(models["bert"])

    return make


def test_second_encoding_comes_from_the_cache(parts, monkeypatch):
    from tasks.classification import ClassificationTask

    task, raw, tokenizer = parts()
    calls = {"n": 0}
    original = ClassificationTask.encode

    def counting(self, ds, tok):
        calls["n"] += 1
        return original(self, ds, tok)

    monkeypatch.setattr(ClassificationTask, "encode", counting)
    first = encode_cached(task, raw, tokenizer)
    second = encode_cached(task, raw, tokenizer)
    assert calls["n"] == 1
    assert first.to_dict() == second.to_dict() == original(task, raw, tokenizer).to_dict()
    encode_cached(task, raw, tokenizer, enabled=False)
    assert calls["n"] == 2


def test_the_key_follows_data_tokenizer_and_settings(parts):
    task, raw, tokenizer = parts()
    key = cache_key(task, raw, tokenizer)
    assert cache_key(task, raw, tokenizer) == key
    assert cache_key(task, raw.select(range(10)), tokenizer) != key
    other_task, other_raw, _ = parts("--max-length", "16")
    assert cache_key(other_task, other_raw, tokenizer) != key
    tokenizer.pad_token = tokenizer.sep_token
    assert cache_key(task, raw, tokenizer) != key
    task = task.bind(state={**task.state, "label_names": ["bad", "good"]})
    assert cache_key(task, raw, tokenizer) != cache_key(*parts())

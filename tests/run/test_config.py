"""Config resolution: defaults, task and method defaults, presets, YAML, flags; the registries."""

from __future__ import annotations

import pytest
import yaml
from conftest import REPO

from ftctl.errors import FtctlError
from ftctl.registry import Registry
from launch.run.config import resolve


def resolved(*argv: str):
    return resolve(list(argv), prog="test")


def test_layering_defaults_preset_method_yaml_flags(tmp_path):
    r = resolved("--task", "sst2", "--method", "lora")
    assert r.cfg.text_column == ["sentence"]  # preset
    assert r.cfg.max_length == 256  # task default
    assert r.cfg.learning_rate == 1e-3  # lora default for classification
    assert resolved("--task", "sst2", "--method", "full").cfg.learning_rate == 1e-4  # full on classification
    assert resolved("--task", "conll2003", "--method", "full").cfg.learning_rate == 5e-5  # full elsewhere
    assert resolved("--task", "imdb").cfg.max_length == 512  # preset beats task default

    config = tmp_path / "run.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "task": "sst2",
                "method": "lora",
                "learning-rate": "5e-4",
                "lora_r": 4,
                "text_column": "review",
                "epochs": 2,
            }
        )
    )
    r = resolved("--config", str(config))
    assert r.cfg.learning_rate == 5e-4 and isinstance(r.cfg.learning_rate, float)  # YAML 1.1 reads 5e-4 as a string
    assert r.method.opts.lora_r == 4 and r.cfg.text_column == ["review"] and r.cfg.epochs == 2.0
    assert sorted(r.explicit) == ["epochs", "learning_rate", "lora_r", "method", "task", "text_column"]
    r = resolved("--config", str(config), "--learning-rate", "1e-4", "--lora-r", "16")
    assert r.cfg.learning_rate == 1e-4 and r.method.opts.lora_r == 16  # flags win over the file


def test_method_defaults_per_task_kind_set_method_options_too():
    """LoRA adapts every linear layer at r=16 for token tasks and regression (measured: query/value is not enough
    there) and the attention query/value at r=8 for classification; the user's values win."""
    ner = resolved("--task", "conll2003", "--method", "lora")
    assert ner.method.opts.target_modules == ["all-linear"] and ner.method.opts.lora_r == 16
    assert ner.cfg.learning_rate == 1e-3
    assert resolved("--task", "stsb", "--method", "dora").method.opts.lora_r == 16
    sst2 = resolved("--task", "sst2", "--method", "lora")
    assert sst2.method.opts.target_modules == [] and sst2.method.opts.lora_r == 8
    mine = resolved("--task", "conll2003", "--method", "lora", "--target-modules", "query", "--lora-r", "4")
    assert mine.method.opts.target_modules == ["query"] and mine.method.opts.lora_r == 4
    assert sorted(mine.explicit) == ["lora_r", "method", "target_modules", "task"]


def test_flat_config_round_trips_through_yaml(tmp_path):
    r = resolved("--task", "sst2", "--method", "freeze", "--freeze-layers", "1", "--seed", "7")
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(r.flat()))
    again = resolved("--config", str(path))
    assert again.flat() == r.flat()


def test_options_of_other_methods_and_tasks_are_refused():
    with pytest.raises(FtctlError, match="--freeze-layers does not apply .* it belongs to: freeze"):
        resolved("--task", "sst2", "--method", "lora", "--freeze-layers", "2")
    with pytest.raises(FtctlError, match="--lora-r does not apply .* it belongs to: lora, rslora, dora"):
        resolved("--task", "sst2", "--method", "head", "--lora-r", "2")


def test_validation_messages():
    with pytest.raises(FtctlError, match="--warmup-ratio must be in"):
        resolved("--task", "sst2", "--warmup-ratio", "1.5")
    with pytest.raises(FtctlError, match="--lora-dropout must be in"):
        resolved("--task", "sst2", "--lora-dropout", "1")
    with pytest.raises(FtctlError, match="say the same thing two ways"):
        resolved("--task", "sst2", "--method", "freeze", "--freeze-layers", "1", "--train-last", "1")


def test_registry_refuses_duplicates_and_suggests():
    registry: Registry[int] = Registry("widget")
    registry.add("alpha", 1)
    with pytest.raises(ValueError, match="registered twice"):
        registry.add("alpha", 2)
    with pytest.raises(FtctlError, match="unknown widget 'alpah' \\(did you mean 'alpha'\\?\\); valid widgets: alpha"):
        registry.get("alpah")


# what the mission names: the registries hold at least these (the catalogue is the registries: launch/catalogue.py)
PROMISED_TASKS = {
    "classification", "sst2", "imdb", "emotion", "amazon_polarity", "ner", "conll2003", "stsb", "squad", "squad_v2",
    "squad_gen", "summarization", "cnn_dailymail", "xsum", "translation", "wmt16_en_ro", "instruction", "alpaca",
    "classification_t2t", "sst2_t2t", "imdb_t2t", "emotion_t2t", "amazon_polarity_t2t",
}  # fmt: skip
PROMISED_METHODS = {
    "full", "freeze", "head", "llrd", "lora", "rslora", "dora", "qlora", "qlora8", "adalora", "ia3", "prompt_tuning",
    "p_tuning", "prefix_tuning", "p_tuning_v2", "adapter",
}  # fmt: skip


def test_every_task_and_method_is_registered():
    """The registries hold what the mission names, and every task or method module registers something (a module
    left out of its package's __init__ would register nothing); helper modules are marked by a leading underscore."""
    import importlib

    from methods import METHODS
    from tasks import TASKS

    assert PROMISED_TASKS <= set(TASKS)
    assert PROMISED_METHODS <= set(METHODS)
    for package, registry in (("tasks", TASKS), ("methods", METHODS)):
        owners = {spec.cls.__module__ for _, spec in registry.items()}
        for path in sorted((REPO / package).glob("*.py")):
            if path.stem in ("__init__", "base") or path.stem.startswith("_"):
                continue
            importlib.import_module(f"{package}.{path.stem}")
            assert f"{package}.{path.stem}" in owners, f"{package}/{path.name} registers nothing"


def test_help_shows_defaults_equal_to_zero():
    from launch.run.config import build_parser

    text = build_parser("ftctl train").format_help()
    assert "data-loading worker processes (default: 0)" in " ".join(text.split())


def test_a_run_recorded_by_an_older_ftctl_still_loads(capsys):
    """run.json of an older ftctl may hold options this one does not have: they are left out with a warning (they
    were a KeyError), while an unknown option given now is still an error."""
    from launch.run.config import resolve_values, stored_values

    values = stored_values({"task": "sst2", "method": "lora", "an_option_of_the_past": 3}, "old/run.json")
    assert "an_option_of_the_past" not in values and resolve_values(values).cfg.task == "sst2"
    assert "an_option_of_the_past" in capsys.readouterr().err
    with pytest.raises(FtctlError, match="unknown option 'an_option_of_the_past'"):
        resolve_values({"task": "sst2", "an_option_of_the_past": 3})

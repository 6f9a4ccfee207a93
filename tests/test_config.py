"""params.yaml validation: every bad value fails up front with a message naming the field."""

from __future__ import annotations

import pytest
import yaml

from helpers import repo_params, run_openllm, snapshot_tree, write_params
from openllm.config import MODEL_PRESETS, ConfigError, Params, load_params, parse_params


def test_repository_params_validate(repo_root):
    params = load_params(repo_root / "params.yaml")
    assert isinstance(params, Params)
    raw = repo_params()
    # Values come from the file, not from the defaults of the classes.
    assert params.data.source == raw["data"]["source"]
    assert params.tokenizer.vocab_size == raw["tokenizer"]["vocab_size"]
    assert params.train.checkpoint_steps == raw["train"]["checkpoint_steps"]
    assert params.evaluate.prompts == raw["evaluate"]["prompts"]
    assert params.pipeline.cron == raw["pipeline"]["cron"]


def test_overrides_are_read(params_file):
    path = params_file({"train": {"max_steps": 20, "checkpoint_steps": [10, 20], "warmup_steps": 2},
                        "tokenizer": {"vocab_size": 512}})
    params = load_params(path)
    assert (params.train.max_steps, params.train.checkpoint_steps) == (20, [10, 20])
    assert params.tokenizer.vocab_size == 512


# (overrides merged onto the repo's params.yaml, substrings the message must contain)
BAD_OVERRIDES = {
    "n_embd_not_divisible": (
        {"model": {"n_embd": 502}}, ["model.n_embd=502 must be divisible by model.n_head=4"]),
    "odd_head_size": ({"model": {"n_embd": 12, "n_head": 4}}, ["model.n_embd/model.n_head=3", "even"]),
    "unknown_key": ({"train": {"lerning_rate": 0.1}}, ["unknown key 'train.lerning_rate'"]),
    "unknown_section": ({"trian": {"max_steps": 3}}, ["unknown key 'trian'"]),
    "wrong_type": ({"train": {"batch_size": "sixteen"}}, ["train.batch_size='sixteen'", "integer"]),
    "negative_batch_size": ({"train": {"batch_size": -4}}, ["train.batch_size=-4", "greater than 0"]),
    "checkpoint_beyond_max_steps": (
        {"train": {"checkpoint_steps": [100, 3000]}},
        ["train.checkpoint_steps=[100, 3000]", "beyond train.max_steps=2400"]),
    "unsorted_checkpoint_steps": (
        {"train": {"checkpoint_steps": [200, 100, 600]}}, ["train.checkpoint_steps=[200, 100, 600]", "increasing"]),
    "repeated_checkpoint_steps": (
        {"train": {"checkpoint_steps": [100, 100, 600]}}, ["train.checkpoint_steps", "without repeats"]),
    "warmup_not_below_max_steps": (
        {"train": {"warmup_steps": 2400}}, ["train.warmup_steps=2400", "train.max_steps=2400"]),
    "min_lr_above_lr": (
        {"train": {"min_learning_rate": 0.01}}, ["train.min_learning_rate=0.01", "train.learning_rate=0.004"]),
    "batch_not_divisible_by_accumulation": (
        {"train": {"gradient_accumulation_steps": 3}}, ["train.batch_size=8", "gradient_accumulation_steps=3"]),
    "unknown_data_source": ({"data": {"source": "s3"}}, ["data.source='s3'", "shakespeare", "files"]),
    "hf_without_dataset": ({"data": {"source": "hf"}}, ["data.source=hf needs data.hf.dataset"]),
    "files_without_glob": ({"data": {"source": "files"}}, ["data.source=files needs data.files.glob"]),
    "validation_fraction_too_big": ({"data": {"validation_fraction": 0.5}}, ["data.validation_fraction=0.5"]),
    "vocab_too_small": ({"tokenizer": {"vocab_size": 100}}, ["tokenizer.vocab_size=100", "300"]),
    "bad_model_type": ({"tokenizer": {"model_type": "wordpiece"}}, ["tokenizer.model_type='wordpiece'"]),
    "unknown_preset": ({"model": {"preset": "huge"}}, ["model.preset='huge'", "tiny"]),
    "bad_cron": ({"pipeline": {"cron": "every day"}}, ["pipeline.cron='every day'", "5 fields"]),
    "cron_four_fields": ({"pipeline": {"cron": "0 3 * *"}}, ["pipeline.cron='0 3 * *'"]),
    "empty_prompt": ({"evaluate": {"prompts": ["ROMEO:", "   "]}}, ["evaluate.prompts[1] is empty"]),
    "no_prompts": ({"evaluate": {"prompts": []}}, ["evaluate.prompts"]),
    "bad_precision": ({"train": {"precision": "fp16"}}, ["train.precision='fp16'", "bf16"]),
    "bad_device": ({"train": {"device": "gpu"}}, ["train.device='gpu'"]),
    "top_p_zero": ({"evaluate": {"sampling": {"top_p": 0}}}, ["evaluate.sampling.top_p=0"]),
    "bad_opset": ({"export": {"opset": 9}}, ["export.opset=9"]),
    "bad_registered_model_name": (
        {"mlflow": {"registered_model": "my model"}}, ["mlflow.registered_model='my model'"]),
    "port_out_of_range": ({"serve": {"port": 70000}}, ["serve.port=70000"]),
    "section_is_a_list": ({"train": [1, 2]}, ["train="]),
    # strict types and finite numbers: what YAML would otherwise turn into a wrong value
    "bool_for_int": ({"train": {"batch_size": True}}, ["train.batch_size=True", "valid integer"]),
    "string_for_int": ({"train": {"max_steps": "40"}}, ["train.max_steps='40'", "valid integer"]),
    "float_for_int": ({"train": {"max_steps": 40.0}}, ["train.max_steps=40.0", "valid integer"]),
    "infinite_weight_decay": ({"train": {"weight_decay": float("inf")}}, ["train.weight_decay=inf", "finite"]),
    "infinite_rope_theta": ({"model": {"rope_theta": float("inf")}}, ["model.rope_theta=inf", "finite"]),
    "nan_learning_rate": ({"train": {"learning_rate": float("nan")}}, ["train.learning_rate=nan", "finite"]),
    "seed_too_big": ({"train": {"seed": 2**64}}, ["train.seed=18446744073709551616", "4294967295"]),
    "negative_sampling_seed": ({"evaluate": {"sampling": {"seed": -1}}}, ["evaluate.sampling.seed=-1"]),
    "context_longer_than_any_corpus": ({"model": {"context_length": 50_000_000}}, ["model.context_length=50000000"]),
    "bool_checkpoint_step": ({"train": {"checkpoint_steps": [True, 20]}}, ["train.checkpoint_steps"]),
    "unknown_time_zone": ({"pipeline": {"timezone": "Mars/Olympus"}}, ["pipeline.timezone='Mars/Olympus'"]),
    "schedule_unknown": ({"train": {"schedule": "linear"}}, ["train.schedule='linear'", "wsd"]),
    "glob_outside_data_folder": (
        {"data": {"source": "files", "files": {"glob": "corpus/*.txt"}}},
        ["data.files.glob='corpus/*.txt' must lie inside data.folder='data/corpus'"]),
    "glob_climbing_out": (
        {"data": {"source": "files", "files": {"glob": "data/corpus/../../*.txt"}}}, ["must not contain '..'"]),
}


@pytest.mark.parametrize("overrides, expected", BAD_OVERRIDES.values(), ids=BAD_OVERRIDES.keys())
def test_bad_value_names_the_field(params_file, overrides, expected):
    path = params_file(overrides)
    with pytest.raises(ConfigError) as info:
        load_params(path)
    message = str(info.value)
    assert message.startswith(f"{path}: "), message
    assert "\n" not in message
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_every_error_is_reported_at_once(params_file):
    path = params_file({"train": {"batch_size": -1, "lerning_rate": 1}, "tokenizer": {"vocab_size": 10}})
    message = str(pytest.raises(ConfigError, load_params, path).value)
    for part in ("train.batch_size=-1", "unknown key 'train.lerning_rate'", "tokenizer.vocab_size=10"):
        assert part in message


# (raw file content, substrings the message must contain)
BAD_FILES = {
    "yaml_syntax": (
        "data:\n  source: files\n  validation_fraction: 0.1: 2\n", ["invalid YAML at line 3", "mapping values"]),
    "yaml_unclosed_list": ("train:\n  max_steps: 10\n  checkpoint_steps: [1, 2\n", ["invalid YAML at line"]),
    "top_level_list": ("- data\n- train\n", ["top level must be a mapping", "list"]),
    "top_level_scalar": ("hello\n", ["top level must be a mapping", "str"]),
    "section_null": ("data:\n", ["data=None"]),
}


@pytest.mark.parametrize("text, expected", BAD_FILES.values(), ids=BAD_FILES.keys())
def test_bad_file_content(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="utf-8")
    message = str(pytest.raises(ConfigError, load_params, path).value)
    assert message.startswith(str(path))
    for part in expected:
        assert part in message, f"{part!r} not in {message!r}"


def test_missing_file(tmp_path):
    message = str(pytest.raises(ConfigError, load_params, tmp_path / "nope.yaml").value)
    assert "nope.yaml" in message and "not found" in message


def test_non_utf8_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes("data:\n  source: shakespeare # caf\u00e9\n".encode("latin-1"))
    message = str(pytest.raises(ConfigError, load_params, path).value)
    assert str(path) in message and "UTF-8" in message


def test_empty_file_means_defaults(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("# nothing set\n", encoding="utf-8")
    assert load_params(path) == Params()


def test_parse_params_rejects_non_mapping():
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        parse_params(["data"])


def test_sections_are_frozen(repo_root):
    params = load_params(repo_root / "params.yaml")
    with pytest.raises(Exception):
        params.train.max_steps = 5  # type: ignore[misc]


# --- model presets --------------------------------------------------------------------------


@pytest.mark.parametrize("preset", sorted(MODEL_PRESETS))
def test_presets_resolve(preset):
    params = parse_params({"model": {"preset": preset}})
    assert params.model.resolved() == MODEL_PRESETS[preset]


def test_default_preset_is_micro(repo_root):
    model = load_params(repo_root / "params.yaml").model
    assert model.preset == "micro"
    assert model.resolved() == MODEL_PRESETS["micro"]
    assert model.resolved() is not MODEL_PRESETS["micro"]  # a copy: callers cannot edit the preset


def test_overrides_apply_on_the_preset():
    model = parse_params({"model": {"preset": "small", "n_layer": 2, "context_length": 64}}).model
    expected = dict(MODEL_PRESETS["small"], n_layer=2, context_length=64)
    assert model.resolved() == expected
    assert MODEL_PRESETS["small"]["n_layer"] == 6  # the preset itself is unchanged


def test_override_is_checked_against_the_preset():
    # n_head=6 alone is fine as a number, but not with the micro preset's n_embd=128.
    with pytest.raises(ConfigError, match=r"model.n_embd=128 must be divisible by model.n_head=6"):
        parse_params({"model": {"n_head": 6}})
    assert parse_params({"model": {"n_head": 4}}).model.resolved()["n_head"] == 4


def test_context_length_must_be_at_least_two():
    with pytest.raises(ConfigError, match="model.context_length"):
        parse_params({"model": {"context_length": 1}})


@pytest.mark.parametrize("value, expected", [(True, "true"), (False, "false"), ("auto", "auto")])
def test_compile_accepts_yaml_booleans(params_file, value, expected):
    # `compile: false` in YAML (or `dvc exp run -S train.compile=false`) is a boolean.
    assert load_params(params_file({"train": {"compile": value}})).train.compile == expected


def test_section_hash():
    a = parse_params({})
    b = parse_params({"train": {"seed": 1}})
    assert a.section_hash("model", "train") == parse_params({}).section_hash("model", "train")
    assert a.section_hash("model", "train") != b.section_hash("model", "train")
    assert a.section_hash("model") == b.section_hash("model")
    assert a.section_hash("train", exclude=("train.seed",)) == b.section_hash("train", exclude=("train.seed",))


# --- the command line -----------------------------------------------------------------------


def _assert_one_line_error(result, *parts):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr + result.stdout
    for part in parts:
        assert part in lines[0]


def test_cli_bad_params_exits_2_without_writing(tmp_path):
    write_params(tmp_path / "bad.yaml", {"model": {"n_embd": 502}})
    result = run_openllm("--params", "bad.yaml", "download", cwd=tmp_path)
    _assert_one_line_error(result, "bad.yaml", "model.n_embd=502", "model.n_head=4")
    assert not (tmp_path / "data").exists()


def test_cli_bad_yaml_names_the_line(tmp_path):
    (tmp_path / "params.yaml").write_text("data:\n  source: [files\n", encoding="utf-8")
    result = run_openllm("tokenize", cwd=tmp_path)
    _assert_one_line_error(result, "params.yaml", "invalid YAML at line")
    assert not (tmp_path / "data").exists()


def test_cli_bad_params_leaves_existing_output_alone(tmp_path):
    raw = tmp_path / "data" / "raw"
    raw.mkdir(parents=True)
    (raw / "train.jsonl").write_text('{"text": "old"}\n', encoding="utf-8")
    (raw / "val.jsonl").write_text('{"text": "older"}\n', encoding="utf-8")
    (raw / "manifest.json").write_text("{}\n", encoding="utf-8")
    before = snapshot_tree(tmp_path / "data")
    write_params(tmp_path, {"data": {"source": "hf"}})  # hf without a dataset
    result = run_openllm("download", cwd=tmp_path)
    _assert_one_line_error(result, "data.hf.dataset")
    assert snapshot_tree(tmp_path / "data") == before
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["raw"]


def test_repository_params_file_is_plain_yaml(repo_root):
    # DVC reads params.yaml too (dvc.yaml `params:`), so it must stay a plain mapping of sections.
    raw = yaml.safe_load((repo_root / "params.yaml").read_text(encoding="utf-8"))
    assert set(raw) == set(Params.model_fields)


def test_check_command_validates_the_whole_file_before_anything_runs(tmp_path):
    """`openllm check` (make run's first step) refuses a typo in a section no stage reads."""
    write_params(tmp_path, {"trian": {"max_steps": 3}})
    result = run_openllm("check", cwd=tmp_path)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: params.yaml: unknown key 'trian' (check the spelling; see params.yaml's comments)"]
    write_params(tmp_path, {})
    result = run_openllm("check", cwd=tmp_path)
    assert result.returncode == 0 and result.stdout.startswith("params.yaml: valid"), result.stderr


def _leaves(model_class, values: dict, prefix: str = ""):
    """(dotted name, field, value in params.yaml) for every leaf field of a section."""
    from pydantic import BaseModel

    for name, field in model_class.model_fields.items():
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _leaves(annotation, values.get(name, {}), f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", field, values.get(name, "<missing>")


def test_every_field_is_documented_and_params_yaml_matches_the_defaults():
    """Each field says what it means once (its description); params.yaml shows every key with
    the class default, so the two places a value is written can never disagree."""
    raw = repo_params()
    missing_descriptions, differing = [], []
    for name, field, value in _leaves(Params, raw):
        if not field.description:
            missing_descriptions.append(name)
        if value != field.get_default(call_default_factory=True):
            differing.append(f"{name}: params.yaml {value!r}, config.py {field.get_default(call_default_factory=True)!r}")
    assert not missing_descriptions, missing_descriptions
    assert not differing, differing

"""YAML mappings from files and ``--set`` overrides: one reader and one parser for every
program."""

import pytest

from common.config_files import ConfigFileError, apply_overrides, read_yaml_mapping


def test_a_yaml_or_json_file_gives_its_mapping(tmp_path):
    (tmp_path / "a.yaml").write_text("port: 9000\noptim:\n  lr: 0.1\n")
    (tmp_path / "b.json").write_text('{"port": 9000}')
    assert read_yaml_mapping(tmp_path / "a.yaml") == {"port": 9000, "optim": {"lr": 0.1}}
    assert read_yaml_mapping(tmp_path / "b.json") == {"port": 9000}


def test_an_empty_file_is_an_empty_mapping(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert read_yaml_mapping(tmp_path / "empty.yaml") == {}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("optim: [unclosed\n", "invalid YAML"),
        ("- a\n- b\n", "expected a mapping of keys, got list"),
    ],
)
def test_a_file_that_is_no_mapping_is_a_one_line_error(tmp_path, text, message):
    (tmp_path / "bad.yaml").write_text(text)
    with pytest.raises(ConfigFileError, match=message) as error:
        read_yaml_mapping(tmp_path / "bad.yaml")
    assert "\n" not in str(error.value)


def test_a_missing_file_is_named_as_what_it_is(tmp_path):
    with pytest.raises(ConfigFileError, match=r"config file not found: .*nope\.yaml"):
        read_yaml_mapping(tmp_path / "nope.yaml", "config file")


def test_overrides_are_read_as_yaml_and_dotted_keys_reach_nested_fields():
    data = {"optim": {"lr": 0.1}}
    overrides = ["optim.lr=0.002", "schedule.milestones=[8, 11]", "amp=false", "name=null"]
    assert apply_overrides(data, overrides) is data
    assert data == {
        "optim": {"lr": 0.002},
        "schedule": {"milestones": [8, 11]},
        "amp": False,
        "name": None,
    }


def test_a_value_may_hold_an_equals_sign():
    assert apply_overrides({}, ["api_keys=[a=b]"]) == {"api_keys": ["a=b"]}


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lr", "not of the form KEY=VALUE"),
        ("=3", "not of the form KEY=VALUE"),
        ("optim..lr=3", "not of the form KEY=VALUE"),
        ("optim.lr=[unclosed", "the value is not valid YAML"),
        ("optim.lr.x=1", r"optim\.lr is a value, not a section"),
    ],
)
def test_malformed_overrides_are_refused_naming_them(override, message):
    with pytest.raises(ConfigFileError, match=message):
        apply_overrides({"optim": {"lr": 0.1}}, [override])

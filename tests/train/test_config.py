import pytest

from pyvf.train.config import ConfigError, TrainConfig, from_dict, load_file, parse_overrides


def test_overrides_parse_and_coerce():
    values = parse_overrides(["--max-steps", "2", "--objective", "verifree", "--seed=5", "--lr", "3e-4",
                              "--output-dir", "/tmp/x", "--progress", "false"])
    cfg = from_dict(values).validate()
    assert (cfg.max_steps, cfg.seed, cfg.lr, cfg.output_dir, cfg.progress) == (2, 5, 3e-4, "/tmp/x", False)


@pytest.mark.parametrize("args,match", [
    (["--max-stepz", "2"], "unknown config key 'max_stepz'"),
    (["--max-steps", "two"], "max_steps must be int"),
    (["--max-steps"], "--max-steps needs a value"),
    (["max-steps", "2"], "expected --key value"),
    (["--group-size", "1"], "group_size must be >= 2 for group advantages"),
    (["--objective", "ppo"], "objective must be one of"),
    (["--dtype", "float16"], "dtype must be one of float32, bfloat16"),
])
def test_bad_overrides(args, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(parse_overrides(args)).validate()


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "max_steps: 7\nlr: 0.001\nobjective: verifree\n"),
    (".toml", "max_steps = 7\nlr = 0.001\nobjective = \"verifree\"\n"),
])
def test_config_files(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text)
    cfg = from_dict(load_file(path))
    assert cfg.max_steps == 7 and cfg.lr == 0.001
    cfg = from_dict(parse_overrides(["--max-steps", "3"]), base=cfg)
    assert cfg.max_steps == 3 and cfg.lr == 0.001


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "c.ini").write_text("x")
    with pytest.raises(ConfigError, match="must be .yaml"):
        load_file(tmp_path / "c.ini")
    (tmp_path / "c.yaml").write_text("bogus_key: 1\n")
    with pytest.raises(ConfigError, match="unknown config key 'bogus_key'"):
        from_dict(load_file(tmp_path / "c.yaml"))


def test_every_field_has_a_default():
    assert TrainConfig().validate().objective == "verifree"

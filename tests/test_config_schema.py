import pytest

from pipeline.config.loading import ConfigError
from pipeline.config.run import RunConfig, load_run_config


def write(tmp_path, text):
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


def test_defaults_and_adapter_conversion(tmp_path):
    cfg = load_run_config(write(tmp_path, "adapter:\n  preset: hydralora\n  num_heads: 4\n"))
    rc = cfg.adapter.to_rlora()
    assert (rc.num_heads, rc.head_init, rc.dropout_mode) == (4, "zero", "shared")
    assert cfg.data.tasks == "five_task" and cfg.model == "smollm2-135m-instruct"
    lora = load_run_config(write(tmp_path, "adapter: {preset: lora}\n"))
    assert lora.adapter.to_rlora().num_heads == 1


@pytest.mark.parametrize(
    "text,expected",
    [
        ("adapter:\n  rank: 8\n", "adapter.rank: unknown key"),
        ("trainn: {steps: 3}\n", "trainn: unknown key"),
        ("train:\n  steps: many\n", "train.steps: Input should be a valid integer"),
        ("adapter:\n  preset: moe\n", "adapter.preset: Input should be"),
        ("data:\n  tasks: [sst2, qqp]\n", "data.tasks: unknown task 'qqp'"),
        ("adapter:\n  head_dropout: 1.5\n", "adapter.head_dropout: Input should be less than 1"),
        ("scaling:\n  num_workers: 0\n", "scaling.num_workers: Input should be greater than or equal to 1"),
        ("train:\n  precision: fp16\n", "train.precision: Input should be 'fp32', 'bf16-mixed' or 'bf16'"),
        ("train:\n  grad_accum: 0\n", "train.grad_accum: Input should be greater than or equal to 1"),
        ("scaling:\n  gpus_per_worker: 1.5\n", "scaling.gpus_per_worker: 1.5: a share above one GPU must be a whole"),
        ("scaling:\n  gpus_per_worker: 0\n", "scaling.gpus_per_worker: Input should be greater than 0"),
        ("scaling:\n  backend: mpi\n", "scaling.backend: Input should be 'auto', 'nccl' or 'gloo'"),
        ("storage: 's3:/bucket'\n", "storage: 's3:/bucket': not a URI"),
        ("train: {dtype: bfloat16, precision: bf16}\n", "train: give train.precision only"),
    ],
)
def test_bad_yaml_is_one_line_naming_the_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as e:
        load_run_config(write(tmp_path, text))
    assert str(e.value).startswith(expected)
    assert "\n" not in str(e.value)


def test_overrides_and_file_errors(tmp_path):
    cfg = load_run_config(write(tmp_path, "train: {steps: 5}\n"), ["train.steps=7", "adapter.gamma=16"])
    assert cfg.train.steps == 7 and cfg.adapter.gamma == 16.0
    with pytest.raises(ConfigError, match="no such file"):
        load_run_config(tmp_path / "missing.yaml")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_run_config(write(tmp_path, "a: [1, 2\n"))
    with pytest.raises(ConfigError, match="expected key=value"):
        load_run_config(None, ["train.steps"])
    assert RunConfig().train.eval_every == 50


@pytest.mark.parametrize("storage, ok", [
    ("s3://bucket/prefix", True), ("gs://b", True), ("file:///mnt/shared/ray", True), ("/mnt/shared/ray", True),
    ("relative/dir", True), (None, True),
    ("s3:/bucket/prefix", False), ("file:/mnt/shared", False), ("gs:b/x:/y", False), ("3s://bucket", False)])
def test_storage_takes_uris_and_paths_and_refuses_malformed_uris(tmp_path, storage, ok):
    """A path or a scheme://... URI is kept as given; a value that looks like a URI but is not one (a
    single slash after the scheme, a scheme that cannot be one) is refused in one line naming
    ``storage`` instead of being taken for a relative directory."""
    text = "storage: null\n" if storage is None else f"storage: {storage!r}\n"
    if not ok:
        with pytest.raises(ConfigError) as e:
            load_run_config(write(tmp_path, text))
        assert str(e.value).startswith("storage:") and "\n" not in str(e.value), str(e.value)
        return
    cfg = load_run_config(write(tmp_path, text))
    assert cfg.storage == storage
    if storage and storage.startswith(("file://", "/")):  # what Ray's storage layer makes of it
        import pyarrow.fs

        fs, path = pyarrow.fs.FileSystem.from_uri(storage if "://" in storage else f"file://{storage}")
        assert isinstance(fs, pyarrow.fs.LocalFileSystem) and path == "/mnt/shared/ray"

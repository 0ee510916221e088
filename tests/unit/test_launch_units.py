"""`harness launch` in one process: the launch-side copy of a piped config, failure markers, the lock."""

import os
import threading

import pytest

from harness.config import find_config_file, yaml12
from harness.errors import HarnessError
from harness.launch import launcher


def test_launch_config_copy_has_the_ranks_limit(tmp_path):
    """`--config /dev/zero` is refused after MAX_BYTES + 1 bytes, with the ranks' message."""
    with pytest.raises(HarnessError) as e:
        launcher._config_for_ranks(["m", "--config", "/dev/zero"], "/dev/zero", str(tmp_path))
    assert str(e.value) == yaml12._too_big("/dev/zero", None)
    assert not (tmp_path / "launch-config.yaml").exists()


def test_launch_config_copy_of_a_pipe(tmp_path):
    read, write = os.pipe()
    writer = threading.Thread(target=lambda: (os.write(write, b"name: piped\n"), os.close(write)))
    writer.start()
    try:
        path = f"/dev/fd/{read}"
        args = launcher._config_for_ranks(["m", "--config", path], path, str(tmp_path))
    finally:
        writer.join()
        os.close(read)
    copy = str(tmp_path / "launch-config.yaml")
    assert args == ["m", "--config", copy]
    assert open(copy).read() == "name: piped\n"


def test_config_that_is_a_directory_says_so(tmp_path):
    assert launcher._config_for_ranks(["m", "--config", str(tmp_path)], str(tmp_path), "o") == [
        "m",
        "--config",
        str(tmp_path),
    ]
    with pytest.raises(HarnessError) as e:
        find_config_file(str(tmp_path), str(tmp_path))
    assert str(e.value) == f"config file {tmp_path} is a directory, not a YAML file"

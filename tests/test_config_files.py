"""Every YAML file the command line reads (label rules, profiles, launch configurations) goes
through one safe loader: a refused tag, a parse error, text that is not UTF-8 or a value of the
wrong type ends the command with one line naming the file (exit 2), never a traceback, and no
tag is ever constructed."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_bad_input import FS, ecg

from ecg_r1.cli import main as cli_main
from ecg_r1.data.canonical import LEADS
from ecg_r1.data.readers.wfdb_write import write_record
from ecg_r1.data.yaml_config import ConfigFileError, load_yaml_mapping

# What a file holds -> a word the one-line message must carry.
BAD_FILES = {
    "tag": ("cinc: !!python/object/apply:os.mkdir [{pwned}]\n", "constructor"),
    "parse-error": ("cinc: [1, 2\nptbxl: {{\n", "line"),
    "top-level-list": ("- cinc\n- ptbxl\n", "mapping"),
    "not-utf8": (b"cinc: \xff\xfe\n", "UTF-8"),
}
# Each command that reads a YAML a user names; {file} is the bad file.
COMMANDS = {
    "ingest-rules": "ingest {export} --out {out} --no-progress --rules {file}",
    "profile": "launch-check ddp --profile {file}",
    "launch-config": "launch-check {file}",
}
# A well-formed YAML mapping whose values have the wrong type, for each kind of file.
WRONG_TYPES = {
    "ingest-rules": "cinc: 5\nptbxl: {{}}\nludb: {{}}\n",
    "profile": "name: x\nsft: 5\n",
    "launch-config": "distributed_type: MULTI_GPU\nnum_processes: two\n",
}


def _run(tmp_path: Path, command: str, content: str | bytes, capsys: pytest.CaptureFixture[str]) -> str:
    export = tmp_path / "export"
    write_record(export / "E1", ecg(1), FS, LEADS)
    bad = tmp_path / "bad.yaml"
    if isinstance(content, bytes):
        bad.write_bytes(content)
    else:
        bad.write_text(content.format(pwned=tmp_path / "pwned"))
    argv = COMMANDS[command].format(export=export, out=tmp_path / "out", file=bad).split()
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err
    assert str(bad) in err
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()
    return err


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("kind", BAD_FILES)
def test_bad_yaml_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str, kind: str
) -> None:
    content, word = BAD_FILES[kind]
    assert word.lower() in _run(tmp_path, command, content, capsys).lower()


@pytest.mark.parametrize("command", COMMANDS)
def test_value_of_the_wrong_type_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    _run(tmp_path, command, WRONG_TYPES[command], capsys)


class TestLoader:
    def test_empty_file_is_an_empty_mapping(self, tmp_path: Path) -> None:
        (tmp_path / "empty.yaml").write_text("")
        assert load_yaml_mapping(tmp_path / "empty.yaml") == {}

    def test_missing_file_names_it(self, tmp_path: Path) -> None:
        with pytest.raises(ConfigFileError, match="cannot read .*missing.yaml"):
            load_yaml_mapping(tmp_path / "missing.yaml")

    def test_parse_error_gives_the_place(self, tmp_path: Path) -> None:
        (tmp_path / "bad.yaml").write_text("a: 1\nb: [2\n")
        with pytest.raises(ConfigFileError, match=r"bad.yaml is not valid YAML at line \d+, column \d+"):
            load_yaml_mapping(tmp_path / "bad.yaml")

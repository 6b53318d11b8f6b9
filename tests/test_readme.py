"""The README's usage example runs and its comparison passes."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_example_runs():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)
    assert blocks, "README.md has no python example"
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)
    report = namespace["compare"](
        namespace["diagonal"],
        namespace["reference_diag_ggn"](
            namespace["model"], namespace["loss_fn"], namespace["inputs"], namespace["targets"]
        ),
        rtol=1e-10,
    )
    report.assert_passed()
    step = namespace["step"]
    assert [s.shape for s in step] == [p.shape for p in namespace["model"].parameters()]


def test_readme_quick_start_is_two_commands():
    text = README.read_text()
    quick_start = text.split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    commands = [line for line in quick_start.splitlines() if line.strip()]
    assert len(commands) == 2
    assert "curvkit demo" in commands[0]
    assert "pytest" in commands[1]
    # The peers pull a torchvision that breaks `import laplace` beside the CPU torch (.ci/run too).
    assert "pip uninstall -y torchvision" in commands[1]

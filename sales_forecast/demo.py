"""The demo: steps 1 -> 2 -> 3 on the embedded local stack, each as its own process, with a time summary.

``python -m sales_forecast.demo [extra step-1 flags]`` (``make demo``).
"""

from __future__ import annotations

import subprocess
import sys
import time

from sales_forecast.config import REPO_ROOT
from sales_forecast.timing import PhaseTimer, console

STEPS = ("01_feast_features.py", "02_training.py", "03_inference.py")


def main(argv: list[str]) -> int:
    timer = PhaseTimer("demo: 01 -> 02 -> 03 on the embedded local stack")
    for script in STEPS:
        args = argv if script == STEPS[0] else []
        console.rule(f"[bold]{script}")
        started = time.perf_counter()
        result = subprocess.run([sys.executable, str(REPO_ROOT / script), *args], cwd=REPO_ROOT, check=False)
        timer.phases[script] = time.perf_counter() - started
        if result.returncode != 0:
            console.print(f"[red]{script} failed with exit code {result.returncode}[/]")
            timer.print_summary()
            return result.returncode
    timer.print_summary()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

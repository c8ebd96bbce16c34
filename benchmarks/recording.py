"""Appending a benchmark's printed result to a Markdown record, under the command that produced it."""

from __future__ import annotations

import platform
import sys
import time


def append_result(out: str, script: str, argv: list[str] | None, report: str) -> None:
    import peft
    import torch
    import transformers

    command = f"python benchmarks/{script} " + " ".join(argv if argv is not None else sys.argv[1:])
    header = (
        f"\n## {time.strftime('%Y-%m-%d')} - {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads\n\nCommand: `{command.strip()}`  \n"
        f"Versions: torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}, "
        f"Python {platform.python_version()}\n\n"
    )
    with open(out, "a", encoding="utf-8") as f:
        f.write(header + report + "\n")

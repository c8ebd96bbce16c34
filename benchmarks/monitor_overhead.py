"""Wall-time overhead of the StabilityMonitor at its default interval, in a real training run.

Trains the demo setting (MiniLM + LoRA on PrivacyQA, Stable-LoRA) for --steps steps with the monitor off and on
(every --every steps), alternating the order over --repeats pairs, and reports the median ratio of training wall
time (monitor on / off), measured in this process.

    python benchmarks/monitor_overhead.py [--steps 60] [--every 10] [--repeats 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile


from recording import append_result  # benchmarks/recording.py (run as python benchmarks/X.py)
from stablelora.demo import DEMO_CONFIG
from stablelora.train.config import load_config
from stablelora.train.run import run_training


def one_run(enabled: bool, steps: int, every: int) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(None, [f"monitor.enabled={str(enabled).lower()}", f"monitor.every={every}",
                                 f"training.max_steps={steps}", "training.save_strategy=no", "data.eval_size=16",
                                 "method.optimizer=stable-lora", "training.disable_tqdm=true"],
                          output_dir=tmp, base=DEMO_CONFIG)
        return run_training(cfg)["train_wall_seconds"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    ratios, on_times, off_times = [], [], []
    for r in range(args.repeats):
        order = (False, True) if r % 2 == 0 else (True, False)
        times = {enabled: one_run(enabled, args.steps, args.every) for enabled in order}
        off_times.append(times[False])
        on_times.append(times[True])
        ratios.append(times[True] / times[False])
    report = (f"monitor every {args.every} steps, {args.steps} steps, {args.repeats} pairs: training wall time "
              f"off {statistics.median(off_times):.1f} s, on {statistics.median(on_times):.1f} s, "
              f"median ratio on/off = {statistics.median(ratios):.3f}x (pairs: "
              f"{', '.join(f'{x:.3f}' for x in ratios)})")
    print(report)
    if args.out:
        append_result(args.out, "monitor_overhead.py", argv, report)

if __name__ == "__main__":
    main()

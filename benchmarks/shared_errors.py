"""Which test cells several kept ``train_pbc.py`` runs get wrong, and whether they agree on the wrong call.

    .venv/bin/python benchmarks/shared_errors.py --keep /tmp/bench/run1 --keep /tmp/bench/run2 \\
        [--keep ...] --out /tmp/bench/test_errors.json

Each run's registered network is scored again on its own test split with the model stage's reader and
the card's test-time views (``SplitReader.outputs``). Runs may differ in image size (then their dataset
versions differ), so cells are matched by their image's content-addressed lake key, not by position.
Errors every network shares, with the same wrong call, point at the images (a label, a cell of
debatable class) rather than at a recipe. Writes each run's errors (image key -> [true, called]).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from recalibrate_pbc import load_kept_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", type=Path, action="append", required=True, help="a kept run folder (two or more)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if len(args.keep) < 2:
        parser.error("comparing errors needs at least two --keep folders")

    import numpy as np

    from hema_pipeline.datasets.splits import TEST
    from hema_pipeline.modeling.stage import SplitReader, load_trained

    errors: dict[str, dict[str, tuple[str, str]]] = {}
    test_cells: set[int] = set()
    for folder in args.keep:
        run = load_kept_run(folder)
        reader = SplitReader(run.dataset, run.lake)
        paths, _ = reader.inputs(TEST)
        outputs = reader.outputs(load_trained(run.lake, run.trained), TEST, run.card.test_time_views)
        called, labels = outputs.logits.argmax(axis=1), outputs.labels
        if labels is None:
            raise RuntimeError("the test split's outputs carry no labels")
        keys = [Path(path).stem for path in paths]
        classes = run.dataset.classes
        errors[str(folder)] = {
            keys[index]: (classes[labels[index]], classes[called[index]]) for index in np.flatnonzero(called != labels)
        }
        test_cells.add(len(keys))
        print(f"{folder}: {len(errors[str(folder)])} of {len(keys)} test cells wrong", flush=True)
    if len(test_cells) != 1:
        parser.error(f"the runs' test splits differ in size: {sorted(test_cells)}")

    runs = list(errors.values())
    wrong_in = collections.Counter(key for run in runs for key in run)
    in_all = [key for key, count in wrong_in.items() if count == len(runs)]
    same_call = [key for key in in_all if len({run[key] for run in runs}) == 1]
    pairs = collections.Counter(runs[0][key] for key in same_call)
    print(f"wrong in at least two runs: {sum(1 for count in wrong_in.values() if count >= 2)}")
    print(f"wrong in all {len(runs)}: {len(in_all)}, with the same wrong call: {len(same_call)}")
    for (true, call), count in pairs.most_common():
        print(f"  {true} called {call}: {count}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps(
            {
                "runs": {run: {key: list(pair) for key, pair in wrong.items()} for run, wrong in errors.items()},
                "wrong_in_all_with_the_same_call": sorted(same_call),
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()

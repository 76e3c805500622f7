"""Compute the golden K-shot picks for ``split_GOLDEN.json``, independently of biomedap.

This re-implements the published Dassl procedure the way the reference code runs it — the
*global* ``random`` module seeded with ``random.seed(seed)``, a ``defaultdict`` grouping by label
(first-appearance order) and ``random.sample`` — and prints the picked relative paths as a Python
literal. The literal was pasted into ``tests/test_data_fewshot.py`` (GOLDEN_PICKS); rerun this
script and compare if that test ever needs to be re-derived. It deliberately does not import
biomedap.

    python tests/golden/make_fewshot_golden.py
"""

import json
import pprint
import random
from collections import defaultdict
from pathlib import Path

SPLIT_FILE = Path(__file__).with_name("split_GOLDEN.json")
CASES = [(1, 1), (2, 2), (4, 1), (8, 3), (16, 1)]  # (shots, seed)


def generate_fewshot(items, num_shots):
    """Dassl DatasetBase.generate_fewshot_dataset for one data source, repeat=False."""
    tracker = defaultdict(list)
    for item in items:
        tracker[item[1]].append(item)
    dataset = []
    for _, group in tracker.items():
        if len(group) >= num_shots:
            dataset.extend(random.sample(group, num_shots))
        else:
            dataset.extend(group)
    return dataset


def main():
    split = json.loads(SPLIT_FILE.read_text())
    golden = {}
    for shots, seed in CASES:
        random.seed(seed)  # set_random_seed(seed) before the dataset is built
        train = generate_fewshot(split["train"], shots)
        val = generate_fewshot(split["val"], min(shots, 4))
        golden[(shots, seed)] = {"train": [t[0] for t in train], "val": [v[0] for v in val]}
    pprint.pprint(golden, width=110)


if __name__ == "__main__":
    main()

"""Write the sample interaction log shipped with the lab (`mos train --data sample`).

A consumed-events log as a service would export it: one row per event, columns user_id, item_id,
timestamp (epoch seconds), category; no label column, so the loader draws sampled negatives.
The events are the histories of the embedded synthetic generator (`mos.lab.data.synthetic`) at
its default settings but SAMPLE_USERS users, seed 0: sessions of one latent interest separated by
pauses, session hopping between interests; a row repeating the one before it in every column
is written once. The file is small enough to read by eye and to ship (about 370 KB);
tests/test_sample_log.py checks that this script writes it byte for byte.

    python -m tools.make_sample_log [PATH]      (default: the shipped file)
"""
from __future__ import annotations

import io
import sys
from pathlib import Path

from mos.lab.data import synthetic
from mos.lab.data.config import SAMPLE_LOG, SyntheticConfig

SAMPLE_USERS = 250


def sample_log_text() -> str:
    """The shipped file's content."""
    ds = synthetic.generate(SyntheticConfig(num_users=SAMPLE_USERS), seed=0)
    offsets = ds.user_offsets.tolist()
    items, categories, times = ds.item_ids.tolist(), ds.category_ids.tolist(), ds.timestamps.tolist()
    out = io.StringIO()
    out.write("user_id,item_id,timestamp,category\n")
    previous = None
    for user in range(len(offsets) - 1):
        for row in range(offsets[user], offsets[user + 1]):
            line = f"{user + 1},{items[row]},{int(times[row])},{categories[row]}\n"
            # The generator can pick an item again 0 s later (gaps are whole seconds): such a row
            # repeats the one before in every column, and the loader would warn about it on the
            # first file a newcomer tries. A real export would hold it once.
            if line != previous:
                out.write(line)
            previous = line
    return out.getvalue()


def main(argv: list[str]) -> int:
    path = Path(argv[0]) if argv else SAMPLE_LOG
    path.write_text(sample_log_text())
    print(f"{path}: {path.stat().st_size:,} bytes")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Parallel word frequency: scatter the lines of a text, count, reduce.

The example first writes a text file of its own (random words, some far
more common than others).  The MultiEngine client scatters the file's
lines over the engines, each engine counts the words of its share with
`collections.Counter`, and the client pulls the per-engine counts and adds
them up.  A serial count of the same file checks the answer.

Run a cluster first (``taskfarm cluster -n 4``), then::

    python word_frequency.py                  # 200,000 lines
    python word_frequency.py --small          # 2,000 lines
    python word_frequency.py --text my.txt    # count my.txt (written first if missing)
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import tempfile

from taskfarm import client

VOCABULARY = (
    "the farm engine task result controller queue retry cluster python twisted "
    "deferred reactor scatter gather pull push map depend property furl profile "
    "numpy matrix sample price option word line count reduce parallel"
).split()


def write_text(path: str, n_lines: int, seed: int = 11) -> None:
    """A text of `n_lines` lines of random words; word i is about 1/(i+1) as
    common as the first (a Zipf-like law, as in real text)."""
    rng = random.Random(seed)
    weights = [1.0 / (i + 1) for i in range(len(VOCABULARY))]
    with open(path, "w") as out:
        for _ in range(n_lines):
            out.write(" ".join(rng.choices(VOCABULARY, weights, k=rng.randint(3, 12))) + "\n")


# The code each engine runs on its own share of the lines, `lines`.
COUNT_WORDS = """
import collections
counts = collections.Counter()
for line in lines:
    counts.update(line.split())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--profile-dir", help="the cluster's profile (default: $TASKFARM_PROFILE or ~/.taskfarm)"
    )
    parser.add_argument("--small", action="store_true", help="a short text")
    parser.add_argument(
        "--text", help="the text file to count (written first if it does not exist)"
    )
    args = parser.parse_args()

    path = args.text or os.path.join(tempfile.mkdtemp(prefix="wordfreq-"), "words.txt")
    if not os.path.exists(path):
        write_text(path, 2_000 if args.small else 200_000)
    with open(path) as f:
        lines = f.read().splitlines()

    mec = client.MultiEngineClient(args.profile_dir)
    mec.scatter("lines", lines)  # contiguous blocks, one per engine
    mec.execute(COUNT_WORDS)  # every engine counts its block
    per_engine = mec.pull("counts")  # one Counter per engine
    total = sum(per_engine, collections.Counter())  # the reduce step, here

    # The same count, serially, as a check.
    serial = collections.Counter(word for line in lines for word in line.split())

    print(
        "%s: %d lines over %d engines, %d words, %d distinct"
        % (path, len(lines), len(per_engine), sum(total.values()), len(total))
    )
    for word, count in total.most_common(10):
        print("%12s %8d" % (word, count))
    print("equal to a serial count:", total == serial)
    mec.execute("del lines, counts")  # leave the engines as we found them
    mec.close()


if __name__ == "__main__":
    main()

"""``python tests/whole_load_train.py ARGS...``: ``zo ARGS`` with rank-by-rank loading off.

A ``train.parallel=fsdp`` run then loads the whole model on every rank and shards it (the
path of the runs made before rank-by-rank loading): the reference that
tests/test_sharded_loading.py compares rank-by-rank runs against. Says so on stderr, as the
real whole-load path does, so a test can tell which path ran.
"""

from __future__ import annotations

import sys

import zo.train
from zo.cli import main
from zo.sharded_loading import _say


def _whole_load(config, attn):
    _say("sharded load: every rank loads the whole model, then shards (tests/whole_load_train)")


if __name__ == "__main__":
    zo.train.load_for_sharding = _whole_load
    sys.exit(main(sys.argv[1:]))

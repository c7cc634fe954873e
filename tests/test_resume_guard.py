"""What a resume accepts and refuses (resume_guard.check_resume), on the guard itself: recipe
keys, the teacher's identity and the launch. The end-to-end refusals are in test_scale.py."""

from __future__ import annotations

import pytest

from uta_cli.errors import UtaUsageError
from uta_cli.resume_guard import check_resume, parse_allow_changes

LAUNCH = {"world_size": 1, "batch_size": 8, "grad_accum": 1}


def guard(old_recipe=None, new_recipe=None, old_teacher=None, new_teacher=None, allow=(),
          **kwargs):
    return check_resume(source="ckpt", old_recipe=old_recipe or {}, new_recipe=new_recipe or {},
                        old_teacher=old_teacher, new_teacher=new_teacher,
                        old_launch=LAUNCH, new_launch=LAUNCH, allow=list(allow), **kwargs)


def test_a_tracker_may_be_added_on_resume_with_allow_changes():
    old = {"train": {"report_to": []}}
    new = {"train": {"report_to": ["tensorboard"]}}
    with pytest.raises(UtaUsageError, match="--allow-changes train.report_to"):
        guard(old, new)
    allow = parse_allow_changes("train.report_to")
    assert guard(old, new, allow=allow).changes == {"train.report_to": [[], ["tensorboard"]]}

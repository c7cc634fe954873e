"""What a resume accepts and refuses (resume_guard.check_resume), on the guard itself: recipe
keys, the teacher's identity and the launch. The end-to-end refusals are in test_scale.py."""

from __future__ import annotations

import pytest

from uta_cli.errors import UtaUsageError
from uta_cli.train.resume_guard import check_resume, parse_allow_changes

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


def _teacher(**changes) -> dict:
    """A recorded teacher identity as a checkpoint holds it (ViT-L-14 on a local file)."""
    import open_clip

    cfg = open_clip.get_model_config("ViT-L-14")
    return {"model": "ViT-L-14", "weights": "/models/vitl14.bin",
            "weights_fingerprint": "1710540580:0123abcd", "weights_sha256": "sha256:aa",
            "embed_dim": 768, "image_size": 224, "model_cfg": cfg,
            "weights_layout": "open_clip", **changes}


TEACHER_RECIPE = {"teacher": {"model": "ViT-L-14", "weights": "/models/vitl14.bin"}}


@pytest.mark.parametrize("other, named", [
    ("ViT-L-14-quickgelu", "teacher.model_cfg.quick_gelu: '(unset)' -> True"),
    ("EVA02-L-14-336", "teacher.image_size: 224 -> 336"),
])
def test_another_teacher_architecture_on_the_same_file_is_refused_unless_allowed(other, named):
    import open_clip

    cfg = open_clip.get_model_config(other)
    new = _teacher(model=other, model_cfg=cfg, image_size=cfg["vision_cfg"]["image_size"])
    if other.startswith("EVA02"):  # the EVA02 file would be a different one; keep it equal
        new["model_cfg"] = _teacher()["model_cfg"]
    recipe = {"teacher": {**TEACHER_RECIPE["teacher"], "model": other}}
    with pytest.raises(UtaUsageError) as err:
        guard(TEACHER_RECIPE, recipe, _teacher(), new)
    msg = " ".join(str(err.value).split())
    assert named in msg and "--allow-changes teacher." in msg
    accepted = guard(TEACHER_RECIPE, recipe, _teacher(), new, allow=parse_allow_changes("teacher"))
    assert any(k.startswith("teacher.") for k in accepted.changes)


def test_weights_layout_and_whole_file_hash_are_compared():
    with pytest.raises(UtaUsageError, match="teacher.weights_layout: 'open_clip' -> 'eva-clip'"):
        guard(TEACHER_RECIPE, TEACHER_RECIPE, _teacher(), _teacher(weights_layout="eva-clip"))
    # the same size and ends (cheap fingerprint), other bytes inside: the whole-file hash tells
    with pytest.raises(UtaUsageError, match="teacher.weights_sha256: 'sha256:aa' -> 'sha256:bb'"):
        guard(TEACHER_RECIPE, TEACHER_RECIPE, _teacher(), _teacher(weights_sha256="sha256:bb"))


def test_a_moved_teacher_with_the_same_content_and_architecture_resumes():
    moved = {"teacher": {"model": "ViT-L-14", "weights": "/elsewhere/vitl14.bin"}}
    assert guard(TEACHER_RECIPE, moved, _teacher(),
                 _teacher(weights="/elsewhere/vitl14.bin")).changes == {}


def test_checkpoints_without_the_whole_file_hash_compare_as_before():
    old = _teacher()
    del old["weights_sha256"]  # as tests/data/checkpoint_v1 and every run before it
    assert guard(TEACHER_RECIPE, TEACHER_RECIPE, old, _teacher(weights_sha256="sha256:cc")
                 ).changes == {}
    with pytest.raises(UtaUsageError, match="teacher.weights_fingerprint"):
        guard(TEACHER_RECIPE, TEACHER_RECIPE, old, _teacher(weights_fingerprint="9:ff"))
    # no fingerprint at all (a hub tag run before fingerprints): the recipe keys are compared
    bare = {k: v for k, v in old.items() if k != "weights_fingerprint"}
    with pytest.raises(UtaUsageError, match="teacher.model: 'ViT-L-14' -> 'ViT-L-14-quickgelu'"):
        guard(TEACHER_RECIPE, {"teacher": {**TEACHER_RECIPE["teacher"],
                                           "model": "ViT-L-14-quickgelu"}}, bare, _teacher())


def test_whole_file_hash_is_sha256_of_every_byte_and_cached_per_machine(tmp_path, monkeypatch):
    import hashlib
    import os

    from uta_cli.models import fingerprint

    data = os.urandom(3 << 20)
    path = tmp_path / "w.bin"
    path.write_bytes(data)
    want = "sha256:" + hashlib.sha256(data).hexdigest()
    assert fingerprint.whole_file_sha256(str(path)) == want  # small: hashed, not cached
    monkeypatch.setenv("UTA_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(fingerprint, "CACHE_FROM_BYTES", 1 << 20)
    assert not (tmp_path / "cache" / "fingerprints").exists()
    assert fingerprint.whole_file_sha256(str(path)) == want
    assert len(os.listdir(tmp_path / "cache" / "fingerprints")) == 1
    # cached by (path, size, mtime): a second process of the machine does not read the file
    reads = []
    monkeypatch.setattr(fingerprint, "sha256_of_file", lambda p: reads.append(p) or "x")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert fingerprint.whole_file_sha256(str(path)) == want and reads == []
    # a new modification time is a new entry; local rank 1 waits for rank 0, then hashes itself
    os.utime(path, ns=(1, 1))
    monkeypatch.setattr(fingerprint, "_WAIT_BASE_S", 0.3)
    assert fingerprint.whole_file_sha256(str(path)) == "sha256:x" and reads == [str(path)]
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert fingerprint.whole_file_sha256(str(path)) == "sha256:x" and len(reads) == 1


DEALT = "tar shards are dealt to processes and loader workers shard by shard"


def test_loader_workers_on_tar_shards_change_only_at_an_epoch_boundary():
    """data.num_workers deals tar shards to workers: mid-epoch (the data's problem is set) it is
    refused with the message of a changed number of processes, even when allowed; at an epoch
    boundary (no problem) --allow-changes data.num_workers accepts it."""
    old, new = {"data": {"num_workers": 4}}, {"data": {"num_workers": 2}}
    allow = parse_allow_changes("data.num_workers")
    with pytest.raises(UtaUsageError) as err:
        guard(old, new, allow=allow, world_change_problem=DEALT)
    assert DEALT in str(err.value)
    assert guard(old, new, allow=allow).changes == {"data.num_workers": [4, 2]}
    assert guard(old, old, world_change_problem=DEALT).changes == {}  # unchanged: fine


def test_a_run_from_before_the_sample_shuffle_resumes_in_its_stored_order_only():
    old = {"data": {"source": "/shards/{0..9}.tar"}}  # written before data.shuffle_buffer
    new = {"data": {**old["data"], "shuffle_buffer": 400, "shuffle_interleave": 8}}
    with pytest.raises(UtaUsageError, match="data.shuffle_buffer: 0 -> 400"):
        guard(old, new)
    stored = {"data": {**new["data"], "shuffle_buffer": 0}}
    assert guard(old, stored).changes == {}


def test_every_task_on_tar_shards_refuses_another_launch_mid_epoch(tmp_path):
    """Pre-training, classification and contrastive tuning share the rule: tar shards mid-epoch
    keep their launch (processes, loader workers, batch), image folders do not need to."""
    from types import SimpleNamespace

    from test_scale import write_shards

    from uta_cli.data.pipeline import MaskCollator, Source, TrainTransform, View, open_dataset
    from uta_cli.tasks.alignment import AlignmentTask
    from uta_cli.tasks.classification import ClassificationTask
    from uta_cli.tasks.contrastive import ContrastiveTask

    write_shards(tmp_path, 2, 2, size=8)
    tf = TrainTransform([View("student", 8, (0.5,) * 3, (0.5,) * 3)], (0.5, 1.0), True, seed=0)
    tar = Source(open_dataset(str(tmp_path / "shard-{00..01}.tar"), "auto", tf), tf,
                 MaskCollator(None, (1, 1), 0), 2, 0, 0, 0, 1, samples_per_epoch=4)
    for task in (AlignmentTask, ClassificationTask, ContrastiveTask):
        fake = SimpleNamespace(source=tar)
        assert DEALT in task.world_change_problem(fake, 2), task
        assert task.world_change_problem(fake, 0) == ""  # an epoch boundary

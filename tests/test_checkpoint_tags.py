from common.checkpoint_folders import COMPLETE, complete_tags, latest_tag, prune


def make(root, tag, complete=True):
    (root / "checkpoints" / tag).mkdir(parents=True)
    if complete:
        (root / "checkpoints" / tag / COMPLETE).write_text("2\n")


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    assert latest_tag(tmp_path) is None
    make(tmp_path, "step_000010")
    make(tmp_path, "step_000020")
    make(tmp_path, "step_000030", complete=False)
    (tmp_path / "checkpoints" / "latest").write_text("step_000030\n")  # a save killed before COMPLETE
    assert latest_tag(tmp_path) == "step_000020"
    (tmp_path / "checkpoints" / "latest").write_text("step_000010\n")
    assert latest_tag(tmp_path) == "step_000010"


def test_visual_tokenizer_checkpoints_of_the_old_tag_width_still_count(tmp_path):
    """The VQ trainer wrote step_0000005 (7 digits) before both trainers shared common/checkpoint_folders.py."""
    make(tmp_path, "step_0000005")
    make(tmp_path, "step_0000020")
    make(tmp_path, "step_000010")
    assert complete_tags(tmp_path) == ["step_0000005", "step_000010", "step_0000020"]
    assert latest_tag(tmp_path) == "step_0000020"
    prune(tmp_path, keep_last=1)
    assert complete_tags(tmp_path) == ["step_0000020"]
